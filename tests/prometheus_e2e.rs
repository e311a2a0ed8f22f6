//! The shipped dashboards and recording rules against a real Prometheus.
//!
//! A Prometheus child process on loopback scrapes tokentap's admin listener (job `tokentap`) and
//! the simulator's `/metrics` (job `vllm`) every second and evaluates every file of
//! `config/prometheus/rules/`. `tokentap bench` and plain requests drive traffic through the proxy:
//! a clean round, then failing (503, in-band error, idle timeout), slow (stall, late response
//! head) and plain requests on every endpoint. Then every query of both dashboards, with its
//! template variables substituted, runs through Prometheus's HTTP API (instant and range queries)
//! (tokentap labels tenants: the plain requests name one, bench's requests none)
//! and must return data; every recording rule must evaluate without error and return data; and
//! the figures are checked against what bench measured and what tokentap counted.
//!
//! A second test proves exemplars: with spans sampled and sent to an OTLP receiver, Prometheus
//! (scraping OpenMetrics, as it asks to) stores exemplars on the TTFT, ITL and E2EL buckets, and
//! each names the trace and span of a request the receiver got.
//!
//! Needs `prometheus` (Debian's `prometheus` package). Without it the test prints "skipped: ..."
//! and passes, unless `TOKENTAP_REQUIRE_EXTERNAL=1`, in which case it fails.
//!
//! `cargo test --profile ci --test prometheus_e2e -- --nocapture` prints what ran.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::*;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokentap::bench::{self, BenchArgs, BenchResult};
use tokentap::config::{Protocol, TracingConfig};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep};

/// Simulator timing: TTFT and decode step.
const SIM_TTFT_MS: f64 = 50.0;
const SIM_ITL_MS: f64 = 8.0;
/// tokentap's goodput bounds: clean requests meet them, stalled and late ones do not.
const SLO_TTFT_MS: f64 = 200.0;
const SLO_TPOT_MS: f64 = 40.0;
/// tokentap's idle timeout: a 700 ms stall passes, a 5 s stall is cut (`upstream_timeout`).
const IDLE_TIMEOUT_SECS: f64 = 1.5;
const FAULT_SLOW_STALL: &str = "stall_after=2,stall_ms=700";
const FAULT_CUT_STALL: &str = "stall_after=2,stall_ms=5000";
const FAULT_LATE_HEAD: &str = "header_delay_ms=300";
const FAULT_STATUS: &str = "status=503";
const FAULT_INBAND: &str = "error_after=3";
/// The tenant of the plain requests (tokentap runs with `telemetry.tenant_header`); bench's
/// requests carry no tenant header, so they are tenant "none".
const TENANT_HEADER: &str = "x-tenant";
const PLAIN_TENANT: &str = "team-a";
/// Output tokens of bench requests.
const OUTPUT_LEN: usize = 16;

/// TTFT buckets (seconds) of tokentap and of vLLM, from docs/METRICS.md.
const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// Dashboard queries that may come back empty here, by dashboard file, panel title and refId,
/// with the metric whose absence is the reason. Each applies only while its reason holds (checked
/// at run time): the simulator does not export the vLLM metric, or tokentap observed nothing in
/// the histogram because the simulator's streams carry no such timings.
const MAY_BE_EMPTY: [(&str, &str, &str, &str); 3] = [
    (LATENCY, "ITL: tokentap vs vLLM server-side", "C", VLLM_ITL),
    (LATENCY, "ITL: tokentap vs vLLM server-side", "D", VLLM_ITL),
    (LATENCY, "Prefix-cache hits beside TTFT", "A", CACHED),
];

/// Dashboard panels whose queries are empty by nature when `$endpoint` selects one endpoint:
/// reasoning happens only in chat (as with vLLM's reasoning parsers).
const EMPTY_FOR_ENDPOINT: [(&str, &str, &str); 1] =
    [(LATENCY, "Reasoning time (p50 / p90 / p99)", "completions")];

/// Recording rules that may come back empty here, with the histogram whose lack of observations
/// is the reason (checked at run time, as for [`MAY_BE_EMPTY`]).
const RULES_MAY_BE_EMPTY: [(&str, &str); 1] =
    [("tokentap:prompt_cached_tokens:ratio_rate5m", CACHED)];

const LATENCY: &str = "tokentap-latency.json";
const WHERE_TTFT_GOES: &str =
    "Where TTFT goes: queue / prefill / outside the engine (mean per request)";

/// The vLLM metric the simulator does not export (real vLLM does).
const VLLM_ITL: &str = "vllm:inter_token_latency_seconds";
/// The tokentap histogram fed by cached prompt tokens, which the simulator does not report (it
/// sends vLLM's per-request metrics and reasoning, so the TTFT breakdown and reasoning time must
/// have data).
const CACHED: &str = "tokentap_request_cached_prompt_tokens";

/// Why `metric` has no data in this test.
fn why_absent(metric: &str) -> String {
    if metric.starts_with("vllm:") {
        format!("the simulator does not export {metric}")
    } else {
        format!("the simulator's streams give {metric} no observation")
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// Prometheus as a child process.

/// A Prometheus process and its temporary directory; killed and removed on drop (also when the
/// test panics, in which case the end of its log is printed).
struct Prometheus {
    child: Child,
    dir: PathBuf,
    base: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            eprintln!("--- last lines of the Prometheus log\n{tail}");
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn prometheus_installed() -> bool {
    Command::new("prometheus")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Copies the rule files into `dir` with every group `interval:` set to 1s, and returns the
/// copies and the intervals that were replaced. The expressions are not touched: only the
/// cadence changes, so that the 1m and 5m groups (6h, 3d and 30d windows) are evaluated within
/// the test instead of up to 5 minutes after start.
fn fast_rule_files(dir: &Path) -> (Vec<PathBuf>, Vec<String>) {
    let mut files: Vec<PathBuf> = fs::read_dir(root().join("config/prometheus/rules"))
        .expect("config/prometheus/rules")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no rule files");
    fs::create_dir_all(dir).unwrap();
    let mut replaced = Vec::new();
    let mut copies = Vec::new();
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        let mut out = String::with_capacity(text.len());
        for line in text.lines() {
            let trimmed = line.trim_start();
            if let Some(value) = trimmed.strip_prefix("interval:") {
                let indent = &line[..line.len() - trimmed.len()];
                replaced.push(format!(
                    "{}: {}",
                    file.file_name().unwrap().to_string_lossy(),
                    value.trim()
                ));
                out.push_str(indent);
                out.push_str("interval: 1s\n");
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        let copy = dir.join(file.file_name().unwrap());
        fs::write(&copy, out).unwrap();
        copies.push(copy);
    }
    (copies, replaced)
}

async fn start_prometheus(tokentap_admin: &str, vllm: &str) -> Prometheus {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!(
        "tokentap-prometheus-e2e-{}-{nanos}",
        std::process::id()
    ));
    fs::create_dir_all(&dir).unwrap();
    let (rules, replaced) = fast_rule_files(&dir.join("rules"));
    println!("rule group intervals set to 1s (were {replaced:?})");
    let rule_list: String = rules
        .iter()
        .map(|p| format!("  - {:?}\n", p.display().to_string()))
        .collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n{rule_list}\
         scrape_configs:\n\
         \x20 - job_name: tokentap\n    static_configs:\n      - targets: [\"{tokentap_admin}\"]\n\
         \x20 - job_name: vllm\n    static_configs:\n      - targets: [\"{vllm}\"]\n"
    );
    let config_file = dir.join("prometheus.yml");
    fs::write(&config_file, config).unwrap();

    // The port is picked by binding :0 and letting go; if another process takes it in between,
    // Prometheus exits and the next attempt picks another.
    for attempt in 1..=3 {
        let port = free_port();
        let log = fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--storage.tsdb.retention.time=1d")
            // Exemplars are kept (and queryable) only with this on.
            .arg("--enable-feature=exemplar-storage")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let mut prom = Prometheus {
            child,
            dir: dir.clone(),
            base: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(&format!("{}/-/ready", prom.base)).await {
                return prom;
            }
            if let Ok(Some(status)) = prom.child.try_wait() {
                let log = fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
                assert!(
                    attempt < 3,
                    "prometheus exited ({status}) three times; last log:\n{log}"
                );
                println!("prometheus exited on port {port} ({status}); retrying");
                // Keep the directory for the next attempt.
                prom.dir = dir.join("gone");
                break;
            }
            assert!(Instant::now() < deadline, "prometheus not ready after 30 s");
            sleep(Duration::from_millis(100)).await;
        }
    }
    unreachable!()
}

// ---------------------------------------------------------------------------------------------
// The HTTP API.

async fn http_get(url: &str) -> Result<(u16, String), String> {
    let req = Request::builder()
        .method(Method::GET)
        .uri(url)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = client().request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One series of a query result: labels and (time, value) points.
#[derive(Debug, Clone)]
struct Series {
    labels: BTreeMap<String, String>,
    points: Vec<(f64, f64)>,
}

impl Series {
    fn value(&self) -> f64 {
        self.points.last().map_or(f64::NAN, |p| p.1)
    }

    fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

fn number(v: &Value) -> f64 {
    match v.as_str().unwrap_or("NaN") {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        s => s.parse().unwrap_or(f64::NAN),
    }
}

fn point(v: &Value) -> (f64, f64) {
    (v[0].as_f64().unwrap_or(f64::NAN), number(&v[1]))
}

impl Prometheus {
    async fn api(&self, path_and_query: &str) -> Value {
        let url = format!("{}{path_and_query}", self.base);
        let (status, body) = http_get(&url)
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let json: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {body}"));
        assert!(
            status == 200 && json["status"] == "success",
            "GET {url}: {status} {body}"
        );
        json["data"].clone()
    }

    /// An instant query at `time`.
    async fn query_at(&self, expr: &str, time: f64) -> Vec<Series> {
        let data = self
            .api(&format!(
                "/api/v1/query?query={}&time={time:.3}",
                encode(expr)
            ))
            .await;
        parse_result(&data)
    }

    async fn query(&self, expr: &str) -> Vec<Series> {
        self.query_at(expr, unix_now()).await
    }

    async fn query_range(&self, expr: &str, start: f64, end: f64, step: f64) -> Vec<Series> {
        let data = self
            .api(&format!(
                "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={step}",
                encode(expr)
            ))
            .await;
        parse_result(&data)
    }
}

fn parse_result(data: &Value) -> Vec<Series> {
    let labels = |m: &Value| -> BTreeMap<String, String> {
        m.as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    };
    match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| Series {
                labels: labels(&s["metric"]),
                points: vec![point(&s["value"])],
            })
            .collect(),
        Some("matrix") => data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| Series {
                labels: labels(&s["metric"]),
                points: s["values"].as_array().unwrap().iter().map(point).collect(),
            })
            .collect(),
        Some("scalar") => vec![Series {
            labels: BTreeMap::new(),
            points: vec![point(&data["result"])],
        }],
        other => panic!("unexpected result type {other:?}: {data}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Dashboards.

/// One query of a dashboard panel.
#[derive(Debug, Clone)]
struct PanelQuery {
    dashboard: String,
    panel: String,
    ref_id: String,
    expr: String,
}

impl PanelQuery {
    fn name(&self) -> String {
        format!("{} / {:?} / {}", self.dashboard, self.panel, self.ref_id)
    }
}

fn collect_queries(dashboard: &str, panels: &[Value], out: &mut Vec<PanelQuery>) {
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push(PanelQuery {
                    dashboard: dashboard.to_owned(),
                    panel: panel["title"].as_str().unwrap_or("(untitled)").to_owned(),
                    ref_id: target["refId"].as_str().unwrap_or("?").to_owned(),
                    expr: expr.to_owned(),
                });
            }
        }
        if let Some(children) = panel["panels"].as_array() {
            collect_queries(dashboard, children, out);
        }
    }
}

/// Every panel query and every template variable query of every dashboard.
fn dashboard_queries() -> (Vec<PanelQuery>, Vec<PanelQuery>) {
    let dir = root().join("grafana/dashboards");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let mut panels = Vec::new();
    let mut variables = Vec::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let json: Value = serde_json::from_str(&fs::read_to_string(&file).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        collect_queries(&name, json["panels"].as_array().unwrap(), &mut panels);
        for var in json["templating"]["list"].as_array().into_iter().flatten() {
            if var["type"] == "query" {
                variables.push(PanelQuery {
                    dashboard: name.clone(),
                    panel: format!("variable {}", var["name"].as_str().unwrap_or("?")),
                    ref_id: "query".to_owned(),
                    expr: var["query"].as_str().unwrap_or_default().to_owned(),
                });
            }
        }
    }
    (panels, variables)
}

/// Replaces `$name` and `${name}` with their values; an unknown variable is an error.
fn substitute(expr: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let braced = after.starts_with('{');
        let body = if braced { &after[1..] } else { after };
        let len = body
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(body.len());
        let name = &body[..len];
        let value = vars
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("unknown variable ${name} in {expr}"))
            .1;
        out.push_str(value);
        rest = if braced {
            assert!(body[len..].starts_with('}'), "unclosed ${{ in {expr}");
            &body[len + 1..]
        } else {
            &body[len..]
        };
    }
    out.push_str(rest);
    out
}

/// A value as Grafana writes a single selected value of a multi-value variable into a
/// Prometheus query: regex metacharacters escaped (`\\.` inside the PromQL string).
fn grafana_regex_escape(value: &str) -> String {
    let mut out = String::new();
    for c in value.chars() {
        if "\\^$.|?*+()[]{}".contains(c) {
            out.push_str("\\\\");
        }
        out.push(c);
    }
    out
}

/// The tokentap model label of a series (or the vLLM one).
fn model_of(s: &Series) -> Option<&str> {
    s.label("model").or_else(|| s.label("model_name"))
}

// ---------------------------------------------------------------------------------------------
// Traffic.

fn sim_config() -> tokentap::simulate::SimConfig {
    let mut c = exact_sim(SIM_TTFT_MS, SIM_ITL_MS);
    c.timing.jitter = 0.1;
    // vLLM's --enable-per-request-metrics: the "Where TTFT goes" queries and rules get data.
    c.request_metrics = true;
    // A reasoning model (vLLM's `reasoning` field, which bench counts as output too): reasoning
    // time and time to first answer get data.
    c.reasoning_tokens = 2;
    c
}

fn bench_args(base: &str, prompts: usize, concurrency: usize, fault: Option<&str>) -> BenchArgs {
    let mut args = BenchArgs::new(base, MODEL);
    args.num_prompts = prompts;
    args.max_concurrency = Some(concurrency);
    args.random_input_len = 64;
    args.random_output_len = OUTPUT_LEN;
    args.disable_tqdm = true;
    if let Some(f) = fault {
        args.headers = vec![format!("x-tokentap-sim-fault: {f}")];
    }
    args
}

/// The bench rounds that run after the clean one (all at once), by name.
fn later_rounds(base: &str, scale: usize) -> Vec<(&'static str, BenchArgs)> {
    let n = |k: usize| if scale == 0 { 1 } else { k };
    let mut completions = bench_args(base, n(64), 8, None);
    completions.endpoint = "/v1/completions".to_owned();
    vec![
        ("503", bench_args(base, n(16), 4, Some(FAULT_STATUS))),
        (
            "inband error",
            bench_args(base, n(16), 4, Some(FAULT_INBAND)),
        ),
        (
            "slow stall",
            bench_args(base, n(4), 4, Some(FAULT_SLOW_STALL)),
        ),
        (
            "late head",
            bench_args(base, n(4), 4, Some(FAULT_LATE_HEAD)),
        ),
        (
            "idle timeout",
            bench_args(base, n(4), 4, Some(FAULT_CUT_STALL)),
        ),
        ("completions", completions),
    ]
}

/// Requests bench does not send: every endpoint, non-streaming, continuous usage, 4xx.
fn plain_requests() -> Vec<(Method, &'static str, String)> {
    let continuous = r#","stream_options":{"include_usage":true,"continuous_usage_stats":true}"#;
    vec![
        (
            Method::POST,
            "/v1/chat/completions",
            chat_body(8, false, ""),
        ),
        (
            Method::POST,
            "/v1/chat/completions",
            chat_body(8, true, continuous),
        ),
        (
            Method::POST,
            "/v1/completions",
            completions_body(8, false, ""),
        ),
        (
            Method::POST,
            "/v1/completions",
            completions_body(8, true, continuous),
        ),
        (
            Method::POST,
            "/v1/embeddings",
            format!(r#"{{"model":"{MODEL}","input":"hi"}}"#),
        ),
        (Method::GET, "/v1/models", String::new()),
        (Method::GET, "/health", String::new()),
        // Over max_model_len: a 400 for the served model.
        (
            Method::POST,
            "/v1/chat/completions",
            chat_body(100_000, true, ""),
        ),
        // Not JSON: a 400 with model "none".
        (Method::POST, "/v1/chat/completions", "{not json".to_owned()),
    ]
}

/// Runs the later bench rounds and `repeat` copies of every plain request, all at once.
async fn later_traffic(
    base: &str,
    scale: usize,
    repeat: usize,
) -> Vec<(&'static str, BenchResult)> {
    let mut set = JoinSet::new();
    for (name, args) in later_rounds(base, scale) {
        set.spawn(async move { Some((name, bench::run(&args).await.expect("bench runs"))) });
    }
    for _ in 0..repeat {
        for (method, path, body) in plain_requests() {
            let url = format!("{base}{path}");
            set.spawn(async move {
                let r = send(
                    &client(),
                    method,
                    &url,
                    &body,
                    &[(TENANT_HEADER, PLAIN_TENANT)],
                )
                .await;
                assert!(r.status.as_u16() < 500, "{path}: {}", r.status);
                None
            });
        }
    }
    let mut rounds = Vec::new();
    while let Some(done) = set.join_next().await {
        if let Some(round) = done.expect("traffic task") {
            rounds.push(round);
        }
    }
    rounds
}

/// tokentap's counters, for the ratios the dashboards should show.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    requests: f64,
    failed: f64,
    eligible: f64,
    good: f64,
}

impl std::ops::Sub for Counts {
    type Output = Counts;
    fn sub(self, o: Counts) -> Counts {
        Counts {
            requests: self.requests - o.requests,
            failed: self.failed - o.failed,
            eligible: self.eligible - o.eligible,
            good: self.good - o.good,
        }
    }
}

async fn counts(admin: std::net::SocketAddr) -> Counts {
    let text = scrape(admin).await;
    let mut c = Counts::default();
    for s in samples(&text) {
        let l = |k: &str| {
            s.labels
                .iter()
                .find(|(n, _)| n == k)
                .map_or("", |(_, v)| v.as_str())
        };
        let generation = matches!(l("endpoint"), "chat" | "completions");
        if s.name == "tokentap_requests_total" {
            c.requests += s.value;
            let server_side = (l("status").starts_with('5') && l("outcome") != "client_disconnect")
                || matches!(
                    l("outcome"),
                    "inband_error" | "upstream_disconnect" | "upstream_timeout" | "connect_error"
                );
            if server_side {
                c.failed += s.value;
            }
            if generation && l("outcome") != "client_disconnect" && !l("status").starts_with('4') {
                c.eligible += s.value;
            }
        } else if s.name == "tokentap_goodput_requests_total" && generation {
            c.good += s.value;
        }
    }
    c
}

/// Waits until Prometheus has scraped both jobs after `after` (unix seconds), twice.
async fn wait_for_scrapes(prom: &Prometheus, after: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = prom.query("timestamp(up == 1)").await;
        let jobs: BTreeSet<&str> = seen
            .iter()
            .filter(|s| s.value() > after + 1.0)
            .filter_map(|s| s.label("job"))
            .collect();
        if jobs.contains("tokentap") && jobs.contains("vllm") {
            return seen.iter().map(Series::value).fold(f64::MIN, f64::max);
        }
        assert!(
            Instant::now() < deadline,
            "no scrape of both jobs after {after}: {seen:?}"
        );
        sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until every rule group has been evaluated at least twice after `after`.
async fn wait_for_rules(prom: &Prometheus, after: f64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rules = prom.api("/api/v1/rules").await;
        let groups = rules["groups"].as_array().cloned().unwrap_or_default();
        let all_evaluated = !groups.is_empty()
            && groups.iter().all(|g| {
                let last = g["lastEvaluation"].as_str().unwrap_or_default();
                rfc3339_seconds(last).is_some_and(|t| t > after + 1.0)
            });
        if all_evaluated {
            return rules;
        }
        assert!(
            Instant::now() < deadline,
            "rule groups not evaluated after {after}"
        );
        sleep(Duration::from_millis(250)).await;
    }
}

/// Seconds since the epoch of an RFC 3339 UTC timestamp as Prometheus writes it
/// (`2026-01-02T03:04:05.123456789Z`, or with a numeric offset).
fn rfc3339_seconds(text: &str) -> Option<f64> {
    let (date, time) = text.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (clock, offset) = match time.find(['Z', '+', '-']) {
        Some(i) => (&time[..i], &time[i..]),
        None => (time, "Z"),
    };
    let mut c = clock.split(':');
    let (h, min, sec) = (
        c.next()?.parse::<f64>().ok()?,
        c.next()?.parse::<f64>().ok()?,
        c.next()?.parse::<f64>().ok()?,
    );
    let offset_secs = if offset == "Z" {
        0.0
    } else {
        let sign = if offset.starts_with('-') { -1.0 } else { 1.0 };
        let (oh, om) = offset[1..].split_once(':')?;
        sign * (oh.parse::<f64>().ok()? * 3600.0 + om.parse::<f64>().ok()? * 60.0)
    };
    // Days from civil (Howard Hinnant's algorithm).
    let yy = if m <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86400.0 + h * 3600.0 + min * 60.0 + sec - offset_secs)
}

/// The bucket (lower, upper] that holds `v`.
fn bucket_of(v: f64) -> (f64, f64) {
    let mut lower = 0.0;
    for b in TTFT_BUCKETS {
        if v <= b {
            return (lower, b);
        }
        lower = b;
    }
    (lower, f64::INFINITY)
}

fn find<'a>(queries: &'a [PanelQuery], panel: &str, ref_id: &str) -> &'a PanelQuery {
    queries
        .iter()
        .find(|q| q.panel == panel && q.ref_id == ref_id)
        .unwrap_or_else(|| panic!("no dashboard query {panel:?} {ref_id}"))
}

fn assert_close(what: &str, got: f64, want: f64) {
    let tolerance = 0.02 + 0.1 * want.abs();
    assert!(
        (got - want).abs() <= tolerance,
        "{what}: the dashboard shows {got:.4}, tokentap counted {want:.4} (tolerance {tolerance:.4})"
    );
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_rules_return_sane_data_from_a_real_prometheus() {
    if !prometheus_installed() {
        assert!(
            !require_external(),
            "TOKENTAP_REQUIRE_EXTERNAL=1 but `prometheus` is not installed or does not run; \
             install Debian's `prometheus` package (bash .ci/setup does this)"
        );
        println!("skipped: dashboards against a real Prometheus: `prometheus` is not installed");
        return;
    }
    let started = Instant::now();

    let sim = sim(sim_config()).await;
    let mut config = proxy_config(&sim.base_url());
    config.slo.ttft_ms = Some(SLO_TTFT_MS);
    config.slo.tpot_ms = Some(SLO_TPOT_MS);
    config.upstream.idle_timeout_secs = IDLE_TIMEOUT_SECS;
    // Tenants on, so that the per-tenant rules and the tenant panels have data.
    config.telemetry.tenant_header = Some(TENANT_HEADER.to_owned());
    // Tracing to a collector that is not there, so that the span-drop counter and its panel
    // have data, as in a deployment whose collector is down.
    let dead_collector = format!("http://127.0.0.1:{}", free_port());
    config.tracing = TracingConfig {
        enabled: true,
        protocol: Some(Protocol::HttpProtobuf),
        endpoint: Some(dead_collector),
        timeout_secs: Some(1.0),
        max_queue_size: Some(4),
        max_export_batch_size: Some(2),
        scheduled_delay_ms: Some(50),
        shutdown_timeout_secs: Some(0.5),
        ..TracingConfig::default()
    };
    let proxy = tokentap::start(config).await.unwrap();
    let admin = proxy.admin_addr().unwrap();
    let base = format!("http://{}", proxy.addr());
    let sim_url = sim.base_url();
    let sim_target = sim_url.trim_start_matches("http://").to_owned();
    let sim_exports_itl = scrape_sim(&sim).await.contains(VLLM_ITL);

    let prom = start_prometheus(&admin.to_string(), &sim_target).await;
    wait_for_scrapes(&prom, unix_now()).await;
    println!(
        "prometheus {} scraping tokentap {admin} and the simulator {sim_target} ({:.1} s)",
        prom.base,
        started.elapsed().as_secs_f64()
    );

    // Priming: one request of every kind, so that every series exists in Prometheus before the
    // measured traffic and rate() counts all of it (a series born between two scrapes loses
    // the increments before its first scrape).
    later_traffic(&base, 0, 1).await;
    let clean_args = bench_args(&base, 1, 1, None);
    bench::run(&clean_args).await.unwrap();
    sleep(Duration::from_secs(3)).await;
    let baseline = counts(admin).await;
    // Rate windows start here: after priming, before any measured request.
    let window_start = unix_now() - 1.5;

    // The clean round, alone.
    let clean = bench::run(&bench_args(&base, 160, 8, None)).await.unwrap();
    assert_eq!(clean.completed().count(), 160, "clean round");
    let clean_summary = clean.summary(&[50.0, 99.0]);
    let clean_eval = unix_now() + 2.5;
    sleep(Duration::from_secs(3)).await;

    // Failing, slow and plain traffic.
    let rounds = later_traffic(&base, 1, 4).await;
    for (name, result) in &rounds {
        let ok = result.completed().count();
        let n = result.requests.len();
        match *name {
            "503" | "inband error" | "idle timeout" => assert_eq!(ok, 0, "{name}: {n} requests"),
            _ => assert_eq!(ok, n, "{name}: {:?}", result.requests.first()),
        }
    }
    let traffic_end = unix_now();
    let measured = counts(admin).await - baseline;
    println!(
        "traffic sent ({:.1} s): clean bench round TTFT median {:.1} ms; {measured:?}",
        started.elapsed().as_secs_f64(),
        clean_summary.ttft_ms.median
    );

    let last_scrape = wait_for_scrapes(&prom, traffic_end).await;
    let rules = wait_for_rules(&prom, last_scrape).await;
    let eval = unix_now();
    let window = format!("{}s", (eval - window_start).ceil() as u64);
    let mut failures: Vec<String> = Vec::new();
    let mut ran = 0usize;

    // Template variable queries: label_values(...) as Grafana runs them.
    let (panels, variables) = dashboard_queries();
    for var in &variables {
        let Some(inner) = var
            .expr
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
        else {
            failures.push(format!(
                "{}: not label_values(...): {}",
                var.name(),
                var.expr
            ));
            continue;
        };
        let (selector, label) = inner.rsplit_once(',').unwrap();
        let selector = substitute(selector.trim(), &[("model", ".*"), ("tenant", ".*")]);
        let data = prom
            .api(&format!(
                "/api/v1/label/{}/values?match[]={}&start={window_start:.3}&end={eval:.3}",
                label.trim(),
                encode(&selector)
            ))
            .await;
        ran += 1;
        let values: BTreeSet<&str> = data
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let want: &[&str] = match label.trim() {
            "model" => &[MODEL],
            "endpoint" => &["chat", "completions", "embeddings", "models", "other"],
            "tenant" => &[PLAIN_TENANT, "none"],
            "upstream" => &[sim_url.as_str()],
            other => panic!("unexpected variable label {other}"),
        };
        for w in want {
            if !values.contains(w) {
                failures.push(format!("{}: {w} not among {values:?}", var.name()));
            }
        }
    }

    // Every panel query: instant over the whole test with All selected, then with the model
    // and one endpoint selected (as Grafana writes a selected value), and a range query as the
    // panel draws it (step 1 s; $__rate_interval = max(4 x scrape interval, step + scrape
    // interval) = 4 s).
    let model_regex = grafana_regex_escape(MODEL);
    let upstream_regex = grafana_regex_escape(&sim_url);
    let variable_sets: [(&str, [(&str, &str); 5]); 5] = [
        (
            "All",
            [
                ("model", ".*"),
                ("endpoint", ".*"),
                ("tenant", ".*"),
                ("upstream", ".*"),
                ("__rate_interval", window.as_str()),
            ],
        ),
        (
            "model, chat",
            [
                ("model", &model_regex),
                ("endpoint", "chat"),
                ("tenant", ".*"),
                ("upstream", ".*"),
                ("__rate_interval", window.as_str()),
            ],
        ),
        (
            "model, completions",
            [
                ("model", &model_regex),
                ("endpoint", "completions"),
                ("tenant", ".*"),
                ("upstream", ".*"),
                ("__rate_interval", window.as_str()),
            ],
        ),
        (
            "one tenant",
            [
                ("model", ".*"),
                ("endpoint", ".*"),
                ("tenant", PLAIN_TENANT),
                ("upstream", ".*"),
                ("__rate_interval", window.as_str()),
            ],
        ),
        (
            "one upstream",
            [
                ("model", ".*"),
                ("endpoint", ".*"),
                ("tenant", ".*"),
                ("upstream", &upstream_regex),
                ("__rate_interval", window.as_str()),
            ],
        ),
    ];
    // The reasons of the exemptions that do not hold: metrics that have data here.
    let mut present: BTreeSet<&str> = BTreeSet::new();
    if sim_exports_itl {
        present.insert(VLLM_ITL);
    }
    for metric in [CACHED] {
        let observed = prom
            .query_at(&format!("sum({metric}_count) > 0"), eval)
            .await;
        if !observed.is_empty() {
            present.insert(metric);
        }
    }
    let mut exemptions_used = BTreeSet::new();
    // Results that hold NaN for a model other than the served one: allowed, and counted.
    let mut not_a_number = BTreeSet::new();
    let mut distinct = BTreeSet::new();
    let mut all_results: BTreeMap<String, Vec<Series>> = BTreeMap::new();
    for q in &panels {
        let exemption = MAY_BE_EMPTY
            .iter()
            .find(|(d, p, r, _)| *d == q.dashboard && *p == q.panel && *r == q.ref_id)
            .filter(|(.., metric)| !present.contains(metric));
        let mut runs: Vec<(String, Vec<Series>)> = Vec::new();
        for (set, vars) in &variable_sets {
            let expr = substitute(&q.expr, vars);
            if !distinct.insert(expr.clone()) {
                continue;
            }
            runs.push((format!("instant, {set}"), prom.query_at(&expr, eval).await));
        }
        let range_expr = substitute(
            &q.expr,
            &[
                ("model", ".*"),
                ("endpoint", ".*"),
                ("tenant", ".*"),
                ("upstream", ".*"),
                ("__rate_interval", "4s"),
            ],
        );
        let range = prom.query_range(&range_expr, window_start, eval, 1.0).await;
        runs.push(("range, All".to_owned(), range.clone()));
        all_results.insert(format!("{}#range", q.name()), range);
        for (how, result) in runs {
            ran += 1;
            if how == "instant, All" {
                all_results.insert(q.name(), result.clone());
            }
            if result.is_empty() {
                match exemption {
                    Some((.., reason)) => {
                        exemptions_used.insert(format!("{}: {}", q.name(), why_absent(reason)));
                    }
                    None if EMPTY_FOR_ENDPOINT.iter().any(|(d, p, endpoint)| {
                        *d == q.dashboard && *p == q.panel && how.ends_with(endpoint)
                    }) =>
                    {
                        exemptions_used.insert(format!(
                            "{} ({how}): the simulator reasons only in chat",
                            q.name()
                        ));
                    }
                    None => failures.push(format!("{} ({how}): no data\n    {}", q.name(), q.expr)),
                }
                continue;
            }
            // Series of the served model (or with no model label) must be numbers; a model
            // label that only saw 4xx requests ("none" here) may divide 0 by 0.
            for s in &result {
                let ours = model_of(s).is_none_or(|m| m == MODEL);
                let nan = s.points.iter().any(|p| !p.1.is_finite());
                if nan && !ours {
                    not_a_number.insert((
                        format!("{} ({how})", q.name()),
                        model_of(s).unwrap_or("").to_owned(),
                    ));
                } else if nan && how.starts_with("instant") {
                    failures.push(format!(
                        "{} ({how}): not a number for {:?}: {:?}",
                        q.name(),
                        s.labels,
                        s.points
                    ));
                }
            }
        }
    }
    let instant = |panel: &str, ref_id: &str| -> Vec<Series> {
        all_results[&find(&panels, panel, ref_id).name()].clone()
    };

    // TTFT p50 of the clean round: within one bucket of bench's median.
    let bench_ttft = clean_summary.ttft_ms.median / 1000.0;
    let (lower, upper) = bucket_of(bench_ttft);
    let clean_window = format!("{}s", (clean_eval - window_start).ceil() as u64);
    for (panel, ref_id) in [
        ("TTFT: time to first token (p50 / p90 / p99)", "A"),
        ("TTFT: tokentap vs vLLM server-side", "A"),
        ("TTFT: tokentap vs vLLM server-side", "C"),
        // One upstream: its TTFT is the proxy's.
        ("TTFT per upstream (p50 / p99)", "A"),
    ] {
        let q = find(&panels, panel, ref_id);
        let expr = substitute(
            &q.expr,
            &[
                ("model", ".*"),
                ("endpoint", ".*"),
                ("upstream", ".*"),
                ("__rate_interval", &clean_window),
            ],
        );
        let result = prom.query_at(&expr, clean_eval).await;
        ran += 1;
        let shown: Vec<f64> = result
            .iter()
            .filter(|s| model_of(s).is_none_or(|m| m == MODEL))
            .map(Series::value)
            .collect();
        let ok = shown.len() == 1 && (shown[0] - bench_ttft).abs() <= upper - lower;
        println!(
            "clean round TTFT p50: {} shows {shown:?} s, bench measured {bench_ttft:.4} s \
             (bucket ({lower}, {upper}])",
            q.name()
        );
        if !ok {
            failures.push(format!(
                "{}: p50 {shown:?} s is not within one bucket ({:.3} s) of bench's median TTFT \
                 {bench_ttft:.4} s",
                q.name(),
                upper - lower
            ));
        }
    }

    // Where TTFT goes: every clean request reported its queue and prefill time, so the stacked
    // means add up to the mean TTFT (outside the engine is TTFT - queue - prefill per request).
    // Not exactly: TTFT is recorded at the first token and the timings at the end of the stream,
    // so a scrape in between sees a few requests in one and not the other; a missing or doubled
    // part is far outside the 10% this allows.
    let mut parts = Vec::new();
    for ref_id in ["A", "B", "C", "D"] {
        let q = find(&panels, WHERE_TTFT_GOES, ref_id);
        let expr = substitute(
            &q.expr,
            &[
                ("model", ".*"),
                ("endpoint", ".*"),
                ("__rate_interval", &clean_window),
            ],
        );
        let result = prom.query_at(&expr, clean_eval).await;
        ran += 1;
        parts.push(match result.as_slice() {
            [one] => one.value(),
            other => {
                failures.push(format!(
                    "{}: one series expected over the clean round, got {other:?}",
                    q.name()
                ));
                f64::NAN
            }
        });
    }
    let stacked = parts[0] + parts[1] + parts[2];
    println!(
        "clean round where TTFT goes: queue {:.4} + prefill {:.4} + outside {:.4} = {stacked:.4} s, \
         mean TTFT {:.4} s",
        parts[0], parts[1], parts[2], parts[3]
    );
    // NaN (a part missing) fails too.
    let adds_up = (stacked - parts[3]).abs() <= 0.1 * parts[3];
    if !adds_up {
        failures.push(format!(
            "where TTFT goes: queue + prefill + outside = {stacked} s, mean TTFT {} s",
            parts[3]
        ));
    }

    // Traffic figures against tokentap's own counters.
    let single = |panel: &str, ref_id: &str| -> f64 {
        let r = instant(panel, ref_id);
        assert_eq!(r.len(), 1, "{panel} {ref_id}: one series expected: {r:?}");
        r[0].value()
    };
    let rate_sum: f64 = instant("Requests per second by outcome", "A")
        .iter()
        .map(Series::value)
        .sum();
    let window_secs = (eval - window_start).ceil();
    assert!(rate_sum > 0.0, "request rate {rate_sum}");
    let implied = rate_sum * window_secs;
    if !(implied >= 0.8 * measured.requests && implied <= 1.3 * measured.requests) {
        failures.push(format!(
            "request rate {rate_sum:.3}/s over {window_secs} s implies {implied:.0} requests; \
             tokentap counted {}",
            measured.requests
        ));
    }
    let error_ratio = single("Error ratio (server-side failures)", "A");
    let truth = measured.failed / measured.requests;
    assert!(truth > 0.0 && truth < 1.0, "{measured:?}");
    println!("error ratio: dashboard {error_ratio:.4}, counted {truth:.4}");
    if !(error_ratio > 0.0 && error_ratio < 1.0) || (error_ratio - truth).abs() > 0.02 + 0.1 * truth
    {
        failures.push(format!(
            "Error ratio (server-side failures) A: the dashboard shows {error_ratio:.4}, \
             tokentap counted {} server-side failures in {} requests ({truth:.4})",
            measured.failed, measured.requests
        ));
    }
    let goodput: Vec<Series> = instant("Goodput ratio vs SLO target", "A")
        .into_iter()
        .filter(|s| s.label("model") == Some(MODEL))
        .collect();
    assert_eq!(goodput.len(), 1, "{goodput:?}");
    let goodput_ratio = goodput[0].value();
    let goodput_truth = measured.good / measured.eligible;
    println!("goodput ratio: dashboard {goodput_ratio:.4}, counted {goodput_truth:.4}");
    assert!(
        goodput_truth > 0.0 && goodput_truth < 1.0,
        "goodput needs good and bad requests: {measured:?}"
    );
    assert!((0.0..=1.0).contains(&goodput_ratio), "{goodput_ratio}");
    assert_close("goodput ratio", goodput_ratio, goodput_truth);
    // Which tenant burns the goodput budget: bench's traffic (no tenant header: "none", with its
    // stalls and late heads) does; the plain requests (one tenant, all within the SLO) do not.
    let mut by_tenant = BTreeMap::new();
    for s in prom
        .query_at("tokentap:tenant_goodput:ratio_rate5m", eval)
        .await
    {
        by_tenant.insert(s.label("tenant").unwrap_or("?").to_owned(), s.value());
    }
    ran += 1;
    println!("goodput ratio per tenant: {by_tenant:?}");
    let keys: Vec<&str> = by_tenant.keys().map(String::as_str).collect();
    if keys != ["none", PLAIN_TENANT]
        || by_tenant[PLAIN_TENANT] != 1.0
        || !(by_tenant["none"] > 0.0 && by_tenant["none"] < 1.0)
    {
        failures.push(format!(
            "tokentap:tenant_goodput:ratio_rate5m: {by_tenant:?}; expected {PLAIN_TENANT} at 1 \
             and none between 0 and 1"
        ));
    }
    for s in instant("In-flight requests", "A") {
        assert!(s.value() >= 0.0, "in-flight {s:?}");
    }
    let busiest = all_results
        [&format!("{}#range", find(&panels, "In-flight requests", "A").name())]
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    assert!(busiest > 0.0, "no request seen in flight during the test");
    assert_eq!(single("Upstream ready / tokentap replicas up", "A"), 1.0);
    assert_eq!(single("Upstream ready / tokentap replicas up", "B"), 1.0);
    assert_eq!(single("Upstream ready / tokentap replicas up", "C"), 1.0);
    let per_chunk = single("Tokens per chunk", "A");
    assert!(per_chunk >= 1.0, "tokens per chunk {per_chunk}");
    for (panel, ref_id) in [
        ("Generation tokens per second", "A"),
        ("Generation tokens per second", "B"),
        ("Prompt tokens per second", "A"),
        ("Good requests per second", "A"),
    ] {
        let v: f64 = instant(panel, ref_id).iter().map(Series::value).sum();
        assert!(v > 0.0, "{panel} {ref_id}: {v}");
    }

    // Recording rules: every one evaluated without error and returns data. Alerts evaluate
    // without error and are pending (their `for` has not elapsed) exactly where this traffic
    // crosses their threshold.
    let objective = |name: &'static str| {
        let prom = &prom;
        async move {
            let r = prom.query_at(name, eval).await;
            assert_eq!(r.len(), 1, "{name}: {r:?}");
            r[0].value()
        }
    };
    let availability_burn = truth / (1.0 - objective("tokentap:slo_availability_objective").await);
    let goodput_burn =
        (1.0 - goodput_truth) / (1.0 - objective("tokentap:slo_goodput_objective").await);
    println!("burn rates: availability {availability_burn:.1}, goodput {goodput_burn:.1}");
    // The traffic mix keeps both well away from the alert factors (14.4, 6 and 1).
    assert!(availability_burn > 14.4 * 1.3, "{availability_burn}");
    assert!(
        goodput_burn > 1.5 && goodput_burn < 6.0 / 1.5,
        "{goodput_burn}"
    );
    let expected_alerts: [(&str, bool, &str); 16] = [
        (
            "TokentapAvailabilityBudgetBurnFast",
            true,
            "the availability burn rate is above 14.4",
        ),
        (
            "TokentapAvailabilityBudgetBurnMedium",
            true,
            "the availability burn rate is above 6",
        ),
        (
            "TokentapAvailabilityBudgetBurnSlow",
            true,
            "the availability burn rate is above 1",
        ),
        (
            "TokentapGoodputBudgetBurnFast",
            false,
            "the goodput burn rate is below 14.4",
        ),
        (
            "TokentapGoodputBudgetBurnMedium",
            false,
            "the goodput burn rate is below 6",
        ),
        (
            "TokentapGoodputBudgetBurnSlow",
            true,
            "the goodput burn rate is above 1",
        ),
        ("TokentapTTFTP99High", false, "p99 TTFT is under 2.5 s"),
        ("TokentapStreamsStalling", false, "p99 ITL is under 1 s"),
        (
            "TokentapUpstreamTimeoutsRising",
            false,
            "under 2% of the requests timed out",
        ),
        ("TokentapDown", false, "tokentap is up"),
        ("TokentapMetricsAbsent", false, "tokentap is scraped"),
        ("TokentapUpstreamNotReady", false, "the simulator answers"),
        (
            "TokentapOtelSpansDropped",
            true,
            "the span collector is down",
        ),
        (
            "TokentapRouteNoLiveUpstream",
            false,
            "the simulator's route had a live endpoint at some scrape of every minute",
        ),
        (
            "TokentapUpstreamEjected",
            false,
            "a burst of 503s ejects the simulator for a second or two at most",
        ),
        (
            "TokentapOtelMetricExportsFailing",
            false,
            "OTLP metrics are off: no export fails",
        ),
    ];
    let mut recorded = 0usize;
    let mut alerts = 0usize;
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["name"].as_str().unwrap_or("?");
            if rule["health"] != "ok" {
                failures.push(format!(
                    "rule {name} ({}): health {} {}",
                    group["name"], rule["health"], rule["lastError"]
                ));
            }
            if rule["type"] == "alerting" {
                alerts += 1;
                let state = rule["state"].as_str().unwrap_or("?");
                let active = state == "pending" || state == "firing";
                match expected_alerts.iter().find(|(n, ..)| *n == name) {
                    Some((_, want, why)) if active != *want => failures.push(format!(
                        "alert {name} is {state}; expected {} because {why}",
                        if *want { "pending" } else { "inactive" }
                    )),
                    Some(_) => {}
                    None => failures.push(format!("alert {name}: no expected state in the test")),
                }
                continue;
            }
            recorded += 1;
            let result = prom.query_at(name, eval).await;
            ran += 1;
            if result.is_empty() {
                match RULES_MAY_BE_EMPTY
                    .iter()
                    .find(|(rule, metric)| *rule == name && !present.contains(metric))
                {
                    Some((_, metric)) => {
                        exemptions_used
                            .insert(format!("recording rule {name}: {}", why_absent(metric)));
                    }
                    None => failures.push(format!("recording rule {name}: no data")),
                }
                continue;
            }
            for s in &result {
                let v = s.value();
                if model_of(s).is_some_and(|m| m != MODEL) {
                    if !v.is_finite() {
                        not_a_number.insert((
                            format!("recording rule {name}"),
                            model_of(s).unwrap_or("").to_owned(),
                        ));
                    }
                    continue;
                }
                let problem = if !v.is_finite() {
                    Some("not a number")
                } else if name.contains("error_budget_remaining") {
                    (v > 1.0).then_some("above 1")
                } else if name.contains(":ratio_") && !(0.0..=1.0).contains(&v) {
                    Some("a ratio outside [0, 1]")
                } else if v < 0.0 {
                    Some("negative")
                } else if (name.contains("seconds:p") || name.starts_with("tokentap:requests:"))
                    && v <= 0.0
                {
                    Some("not positive")
                } else {
                    None
                };
                if let Some(p) = problem {
                    failures.push(format!("recording rule {name}: {p}: {v} {:?}", s.labels));
                }
            }
        }
    }
    for (name, lo, hi) in [
        ("tokentap:availability_errors:ratio_rate5m", 0.0, 1.0),
        ("tokentap:goodput:ratio_rate5m", 0.0, 1.0),
        ("tokentap:requests_upstream_timeout:ratio_rate5m", 0.0, 1.0),
        ("tokentap:availability_burn_rate:rate3d", 0.0, f64::INFINITY),
        ("tokentap:goodput_burn_rate:rate30d", 0.0, f64::INFINITY),
    ] {
        let r = prom
            .query_at(&format!("{name}{{model=\"{MODEL}\"}}"), eval)
            .await;
        ran += 1;
        let v = r.first().map_or(f64::NAN, Series::value);
        if r.len() != 1 || !(v > lo && v < hi) {
            failures.push(format!("{name}: {r:?}, expected one value in ({lo}, {hi})"));
        }
    }

    println!(
        "ran {ran} Prometheus queries: {} panel queries of {} dashboards ({} distinct instant \
         queries, {} range queries), {} template variables, {recorded} recording rules \
         ({alerts} alerting rules evaluated); {:.1} s in all",
        panels.len(),
        panels
            .iter()
            .map(|q| q.dashboard.as_str())
            .collect::<BTreeSet<_>>()
            .len(),
        distinct.len(),
        panels.len(),
        variables.len(),
        started.elapsed().as_secs_f64()
    );
    if !not_a_number.is_empty() {
        let queries: BTreeSet<&String> = not_a_number.iter().map(|(q, _)| q).collect();
        let models: BTreeSet<&String> = not_a_number.iter().map(|(_, m)| m).collect();
        println!(
            "{} query results hold NaN (0/0) series for model labels {models:?}, which saw only \
             4xx requests (allowed)",
            queries.len()
        );
    }
    for e in &exemptions_used {
        println!("allowed to be empty: {e}");
    }
    drop(prom);
    proxy.shutdown().await;
    sim.shutdown().await;
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Exemplars.

/// `GET /metrics` from the admin listener with `accept`: (content type, body).
async fn scrape_admin(admin: std::net::SocketAddr, accept: &str) -> (String, String) {
    let req = Request::builder()
        .uri(format!("http://{admin}/metrics"))
        .header(http::header::ACCEPT, accept)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let content_type = resp.headers()[http::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (content_type, String::from_utf8(body.to_vec()).unwrap())
}

/// Every sample line of an exposition, without its exemplar: `name{labels}` → value.
fn sample_lines(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split(" # ").next().unwrap())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_owned(), value.to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exemplars_open_the_traces_the_collector_received() {
    if !prometheus_installed() {
        assert!(
            !require_external(),
            "TOKENTAP_REQUIRE_EXTERNAL=1 but `prometheus` is not installed or does not run"
        );
        println!("skipped: exemplars against a real Prometheus: `prometheus` is not installed");
        return;
    }
    let mut collector = fake_opentelemetry_collector::FakeCollectorServer::start()
        .await
        .expect("fake collector");
    let sim = sim(sim_config()).await;
    let mut config = proxy_config(&sim.base_url());
    config.tracing = TracingConfig {
        enabled: true,
        protocol: Some(Protocol::Grpc),
        endpoint: Some(collector.endpoint()),
        scheduled_delay_ms: Some(20),
        ..TracingConfig::default()
    };
    let proxy = tokentap::start(config).await.unwrap();
    let admin = proxy.admin_addr().unwrap();
    let base = format!("http://{}", proxy.addr());
    let sim_target = sim.base_url().trim_start_matches("http://").to_owned();
    let prom = start_prometheus(&admin.to_string(), &sim_target).await;
    let start = unix_now();
    wait_for_scrapes(&prom, start).await;

    let result = bench::run(&bench_args(&base, 12, 4, None)).await.unwrap();
    assert_eq!(result.completed().count(), 12);
    let end = wait_for_scrapes(&prom, unix_now()).await;

    // Plain text for a scraper that asks for it, OpenMetrics for one that prefers it: the same
    // samples, exemplars and `# EOF` only in OpenMetrics.
    let (text_type, text) = scrape_admin(admin, "text/plain;version=0.0.4").await;
    let (om_type, om) = scrape_admin(
        admin,
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    )
    .await;
    assert!(
        text_type.starts_with("text/plain; version=0.0.4"),
        "{text_type}"
    );
    assert!(
        om_type.starts_with("application/openmetrics-text; version=1.0.0"),
        "{om_type}"
    );
    assert!(!text.contains("trace_id") && !text.contains("# EOF"));
    assert!(om.ends_with("# EOF\n") && !om.contains("\n\n"));
    assert!(om.contains("# TYPE tokentap_requests counter\n"), "{om}");
    let (text_samples, om_samples) = (sample_lines(&text), sample_lines(&om));
    for (series, value) in &text_samples {
        // Gauges of the moment (open connections, in flight) may move between the two scrapes.
        if !series.starts_with("tokentap_connections_open") {
            assert_eq!(om_samples.get(series), Some(value), "{series}");
        }
    }
    assert_eq!(text_samples.len(), om_samples.len());

    // The spans the receiver got, by trace id: span id.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut spans: BTreeMap<String, String> = BTreeMap::new();
    while spans.len() < 12 && Instant::now() < deadline {
        for s in collector.exported_spans(0, Duration::ZERO).await {
            spans.insert(s.trace_id, s.span_id);
        }
        sleep(Duration::from_millis(50)).await;
    }
    assert!(spans.len() >= 12, "{} spans received", spans.len());

    for family in [
        "tokentap_time_to_first_token_seconds_bucket",
        "tokentap_inter_token_latency_seconds_bucket",
        "tokentap_e2e_request_latency_seconds_bucket",
    ] {
        let data = prom
            .api(&format!(
                "/api/v1/query_exemplars?query={}&start={:.3}&end={:.3}",
                encode(family),
                start - 60.0,
                end + 60.0
            ))
            .await;
        let exemplars: Vec<&Value> = data
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|series| series["exemplars"].as_array().unwrap())
            .collect();
        assert!(!exemplars.is_empty(), "{family}: no exemplars stored");
        for e in &exemplars {
            let trace = e["labels"]["trace_id"].as_str().unwrap();
            let span = e["labels"]["span_id"].as_str().unwrap();
            assert_eq!(
                spans.get(trace).map(String::as_str),
                Some(span),
                "{family}: exemplar {e} names no span the receiver got"
            );
        }
        println!(
            "{family}: {} exemplars, each a received span",
            exemplars.len()
        );
    }
    proxy.shutdown().await;
    collector.abort();
}
