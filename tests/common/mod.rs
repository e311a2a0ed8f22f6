//! Helpers shared by the integration tests: an in-process simulator and proxy on
//! `127.0.0.1:0`, a plain HTTP client, and a small Prometheus text parser; `otlp` has what the
//! OpenTelemetry tests share.
#![allow(dead_code)]

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokentap::config::Config;
use tokentap::simulate::{SimConfig, Simulator};

pub mod otlp;

pub const MODEL: &str = "Qwen/Qwen2.5-7B-Instruct";

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A simulator with exact timings: TTFT `ttft_ms`, one token every `itl_ms`, no jitter, no
/// slowdown with concurrency, and a fixed seed.
pub fn exact_sim(ttft_ms: f64, itl_ms: f64) -> SimConfig {
    let mut c = SimConfig {
        seed: Some(7),
        ..SimConfig::default()
    };
    c.timing.ttft_base_ms = ttft_ms;
    c.timing.prefill_ms_per_1k_tokens = 0.0;
    c.timing.itl_ms = itl_ms;
    c.timing.jitter = 0.0;
    c.timing.slowdown_per_seq = 0.0;
    c
}

pub async fn sim(config: SimConfig) -> Simulator {
    Simulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("simulator starts")
}

/// A proxy config in front of `upstream`, on free loopback ports, with `MODEL` as a label.
pub fn proxy_config(upstream: &str) -> Config {
    let mut c = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Config::default()
    };
    c.upstream.url = upstream.to_owned();
    c.telemetry.models = vec![MODEL.to_owned()];
    c.telemetry.access_log = false;
    c.proxy.shutdown_grace_secs = 1.0;
    c
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub async fn send(
    client: &TestClient,
    method: Method,
    url: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    if !body.is_empty() {
        req = req.header("content-type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    let resp = client.request(req).await.expect("request is answered");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body arrives whole").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn post(client: &TestClient, url: &str, body: &str) -> Reply {
    send(client, Method::POST, url, body, &[]).await
}

pub async fn scrape(admin: SocketAddr) -> String {
    let r = send(
        &client(),
        Method::GET,
        &format!("http://{admin}/metrics"),
        "",
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    String::from_utf8(r.body.to_vec()).unwrap()
}

/// The simulator's `vllm:` metrics text.
pub async fn scrape_sim(sim: &Simulator) -> String {
    let r = send(
        &client(),
        Method::GET,
        &format!("{}/metrics", sim.base_url()),
        "",
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    String::from_utf8(r.body.to_vec()).unwrap()
}

/// One sample of the Prometheus text format.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

pub fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split("\",")
            .filter(|s| !s.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once("=\"").unwrap();
                (k.to_owned(), v.trim_end_matches('"').to_owned())
            })
            .collect();
        out.push(Sample {
            name: name.to_owned(),
            labels,
            value: value.parse().unwrap(),
        });
    }
    out
}

/// `tokentap_requests_total` for one outcome and status, summed over the other labels.
pub fn requests_total(text: &str, outcome: &str, status: &str) -> f64 {
    value(
        text,
        "tokentap_requests_total",
        &[("outcome", outcome), ("status", status)],
    )
}

/// The sum of every sample of `name` whose labels include all of `want`.
pub fn value(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    samples(text)
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            want.iter()
                .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|s| s.value)
        .sum()
}

pub fn chat_body(max_tokens: u32, stream: bool, extra: &str) -> String {
    format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"Tell me about proxies"}}],"max_tokens":{max_tokens},"stream":{stream}{extra}}}"#
    )
}

pub fn completions_body(max_tokens: u32, stream: bool, extra: &str) -> String {
    format!(
        r#"{{"model":"{MODEL}","prompt":"Once upon a time","max_tokens":{max_tokens},"stream":{stream}{extra}}}"#
    )
}

/// True when a test that needs an external tool must fail rather than skip.
pub fn require_external() -> bool {
    std::env::var("TOKENTAP_REQUIRE_EXTERNAL").is_ok_and(|v| v == "1")
}

/// Fields of each `tokentap::access` line, as text.
pub type AccessLog =
    std::sync::Arc<std::sync::Mutex<Vec<std::collections::HashMap<String, String>>>>;

/// Every access-log line this test binary writes from now on. The first call installs the
/// global log subscriber that keeps them (one per test binary); later calls share it.
pub fn access_log() -> AccessLog {
    use std::collections::HashMap;
    use tracing::field::{Field, Visit};
    use tracing_subscriber::layer::{Context, SubscriberExt};

    struct Capture(AccessLog);
    struct Fields(HashMap<String, String>);
    impl Visit for Fields {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.insert(field.name().to_owned(), format!("{value:?}"));
        }
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0.insert(field.name().to_owned(), value.to_owned());
        }
        fn record_f64(&mut self, field: &Field, value: f64) {
            self.0.insert(field.name().to_owned(), value.to_string());
        }
    }
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
        fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
            if event.metadata().target() == "tokentap::access" {
                let mut f = Fields(HashMap::new());
                event.record(&mut f);
                self.0.lock().unwrap().push(f.0);
            }
        }
    }
    static LINES: std::sync::OnceLock<AccessLog> = std::sync::OnceLock::new();
    LINES
        .get_or_init(|| {
            let lines = AccessLog::default();
            tracing::subscriber::set_global_default(
                tracing_subscriber::registry().with(Capture(lines.clone())),
            )
            .expect("no other global subscriber in this test binary");
            lines
        })
        .clone()
}

/// A `tokentap serve` child process, started with `args`, once it has logged that it serves:
/// its first stderr line is `line`, the rest can be read from `stderr`.
pub struct Serving {
    pub child: std::process::Child,
    pub stderr: std::io::BufReader<std::process::ChildStderr>,
    pub line: String,
}

impl Serving {
    pub fn start(args: &[&str]) -> Serving {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tokentap"))
            .arg("serve")
            .args(args)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        assert!(line.contains("tokentap serving"), "{line}");
        Serving {
            child,
            stderr,
            line,
        }
    }

    /// Sends `signal` (as `kill` spells it, e.g. `-HUP`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}
