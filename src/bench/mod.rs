//! `tokentap bench`: a client that measures like `vllm bench serve`.
//!
//! Each request is timed from the moment it is sent; every SSE event is timestamped when the
//! client reads it. The first event with a non-empty `choices` is the first token (TTFT), each
//! later one gives an ITL sample, E2EL ends at the last such event, output length comes from
//! `usage.completion_tokens`, and TPOT is `(E2EL - TTFT) / (output - 1)`: the definitions of
//! `docs/METRICS.md`, which match `vllm bench serve`.

mod backend;
pub mod dataset;

pub use backend::Backend;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt, Either, Full};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand_distr::{Distribution as _, Gamma};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::latency::{Latency, Observation};
use crate::net;
use crate::report::{ALL_METRICS, Distribution, ModelSummary, fmt_pct, render_table};
use crate::sse::{Dialect, EventKind, SseParser};
use dataset::Sample;

/// Which workload to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DatasetName {
    /// Synthetic prompts of `--random-input-len` tokens.
    Random,
    /// Conversations from `--dataset-path` (ShareGPT JSON).
    Sharegpt,
}

/// `tokentap bench` options (named as in `vllm bench serve`).
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// Base URL of the server (tokentap, vLLM, or any OpenAI-compatible server).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub base_url: String,
    /// API path: /v1/chat/completions, /v1/completions, /v1/responses or /v1/messages
    /// (default: the path of `--backend`, else /v1/chat/completions).
    #[arg(long, default_value = BenchArgs::DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// The API spoken: openai-chat, openai (completions), openai-responses or
    /// anthropic-messages (default: the one `--endpoint` names).
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
    /// Model name sent in each request.
    #[arg(long)]
    pub model: String,
    /// Number of requests.
    #[arg(long, default_value_t = 1000)]
    pub num_prompts: usize,
    /// Requests per second (Poisson arrivals; `inf` sends all at once).
    #[arg(long, default_value_t = f64::INFINITY)]
    pub request_rate: f64,
    /// Burstiness of arrivals (1 = Poisson; lower is burstier); gamma-distributed gaps.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// At most this many requests in flight.
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Workload source.
    #[arg(long, value_enum, default_value = "random")]
    pub dataset_name: DatasetName,
    /// ShareGPT JSON file (implies `--dataset-name sharegpt`).
    #[arg(long)]
    pub dataset_path: Option<PathBuf>,
    /// Output length for every ShareGPT request (default: the length of its recorded answer).
    #[arg(long)]
    pub sharegpt_output_len: Option<usize>,
    /// Prompt tokens of random requests.
    #[arg(long, default_value_t = 1024)]
    pub random_input_len: usize,
    /// Output tokens of random requests.
    #[arg(long, default_value_t = 128)]
    pub random_output_len: usize,
    /// Random lengths are drawn from `[len * (1 - r), len * (1 + r)]`.
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,
    /// Seed for the workload and the arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Figures to report percentiles of: comma-separated ttft, tpot, itl, e2el.
    #[arg(long, default_value = "ttft,tpot,itl")]
    pub percentile_metrics: String,
    /// Percentiles to report, comma-separated (e.g. `50,90,99`).
    #[arg(long, default_value = "99")]
    pub metric_percentiles: String,
    /// SLOs for goodput, as `ttft:MS tpot:MS e2el:MS`.
    #[arg(long, num_args = 1..)]
    pub goodput: Vec<String>,
    /// Send `ignore_eos: true` (vLLM) so that every request generates its full output length.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Write per-request results to a JSON file.
    #[arg(long)]
    pub save_result: bool,
    /// File for `--save-result` (default: tokentap-bench-<model>-<rate>qps-<time>.json).
    #[arg(long)]
    pub result_filename: Option<PathBuf>,
    /// Extra request header `Name: value` (repeatable), e.g. an Authorization header.
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// Requests sent before the measured run (the first prompt, at most `--max-concurrency` at
    /// a time) and left out of the results: they open the connections the run then reuses.
    #[arg(long, default_value_t = 0)]
    pub num_warmups: usize,
    /// No progress bar.
    #[arg(long)]
    pub disable_tqdm: bool,
    /// Also measure one-way chunk latency: receive time minus the emit time the server wrote
    /// into each chunk as `"tokentap_emit_ns"` (`tokentap simulate` with `stamp_emit_time =
    /// true`). Server and client must share a clock, i.e. run on the same machine.
    #[arg(long)]
    pub chunk_latency: bool,
}

impl BenchArgs {
    /// `--endpoint` when not given.
    pub const DEFAULT_ENDPOINT: &'static str = "/v1/chat/completions";

    /// Options with the defaults of the command line, for `model` at `base_url`.
    pub fn new(base_url: &str, model: &str) -> BenchArgs {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            args: BenchArgs,
        }
        Wrap::parse_from(["bench", "--base-url", base_url, "--model", model]).args
    }
}

/// What `tokentap bench` could not do.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A bad option.
    #[error("{0}")]
    Usage(String),
    /// The workload could not be built.
    #[error(transparent)]
    Dataset(#[from] dataset::DatasetError),
    /// The result file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The measurement of one request.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RequestResult {
    /// The `x-request-id` it was sent with.
    pub request_id: String,
    /// HTTP 200 and a stream without an error event.
    pub success: bool,
    /// Why it failed.
    pub error: String,
    /// Seconds to the first output event.
    pub ttft: f64,
    /// Gaps between output events of a choice, seconds.
    pub itl: Vec<f64>,
    /// Seconds to the last output event.
    pub latency: f64,
    /// Completion tokens (usage, else counted output events).
    pub output_tokens: u64,
    /// The server's queue time, seconds, when it reported one (vLLM's per-request `metrics`,
    /// as `vllm bench serve` reads it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_queue_time: Option<f64>,
    /// The server's prefill time (vLLM `time_to_first_token_ms`, llama.cpp `prompt_ms`),
    /// seconds, when it reported one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_ttft: Option<f64>,
    /// The server's decode time (vLLM `generation_time_ms`, llama.cpp `predicted_ms`),
    /// seconds, when it reported one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_decode_time: Option<f64>,
    /// Prompt tokens (usage, else the estimate).
    pub prompt_len: u64,
    /// Seconds from the start of the run to sending this request.
    pub start_time: f64,
    /// With `--chunk-latency`: receive time minus emit time of each stamped token event,
    /// seconds.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chunk_latency: Vec<f64>,
    /// The client side of the connection it went on: the first request (by `start_time`) on an
    /// address is the one that opened that connection, and its TTFT includes the connect.
    #[serde(skip)]
    pub local_addr: Option<std::net::SocketAddr>,
}

impl RequestResult {
    /// TPOT in seconds, when the request produced more than one token.
    pub fn tpot(&self) -> Option<f64> {
        (self.output_tokens > 1)
            .then(|| (self.latency - self.ttft) / (self.output_tokens - 1) as f64)
    }
}

/// A finished run.
#[derive(Clone, Debug)]
pub struct BenchResult {
    /// Per request, in workload order.
    pub requests: Vec<RequestResult>,
    /// Seconds from the first request sent to the last one done.
    pub duration: f64,
    /// Goodput bounds (ms) that were checked.
    pub goodput: Vec<(String, f64)>,
}

/// `numpy.percentile` with linear interpolation, of sorted, non-empty values.
fn percentile_sorted(v: &[f64], p: f64) -> f64 {
    let rank = p / 100.0 * (v.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
}

/// Mean, median, std and percentiles of values given in seconds, reported in ms.
pub fn distribution(seconds: &[f64], percentiles: &[f64]) -> Distribution {
    let mut v: Vec<f64> = seconds.iter().map(|s| s * 1000.0).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return Distribution {
            count: 0,
            mean: 0.0,
            median: 0.0,
            std: 0.0,
            percentiles: percentiles.iter().map(|p| (*p, 0.0)).collect(),
        };
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
    Distribution {
        count: v.len() as u64,
        mean,
        median: percentile_sorted(&v, 50.0),
        std: var.sqrt(),
        percentiles: percentiles
            .iter()
            .map(|p| (*p, percentile_sorted(&v, *p)))
            .collect(),
    }
}

impl BenchResult {
    /// Successful requests.
    pub fn completed(&self) -> impl Iterator<Item = &RequestResult> {
        self.requests.iter().filter(|r| r.success)
    }

    /// The summary in the shape `/stats` uses, so the two can be printed and compared alike.
    pub fn summary(&self, percentiles: &[f64]) -> ModelSummary {
        let ok: Vec<&RequestResult> = self.completed().collect();
        let input: u64 = ok.iter().map(|r| r.prompt_len).sum();
        let output: u64 = ok.iter().map(|r| r.output_tokens).sum();
        let d = self.duration.max(1e-9);
        let ttfts: Vec<f64> = ok.iter().map(|r| r.ttft).collect();
        let tpots: Vec<f64> = ok.iter().filter_map(|r| r.tpot()).collect();
        let itls: Vec<f64> = ok.iter().flat_map(|r| r.itl.iter().copied()).collect();
        let e2els: Vec<f64> = ok.iter().map(|r| r.latency).collect();
        ModelSummary {
            completed: ok.len() as u64,
            duration_s: self.duration,
            total_input_tokens: input,
            total_output_tokens: output,
            request_throughput: ok.len() as f64 / d,
            output_throughput: output as f64 / d,
            total_token_throughput: (input + output) as f64 / d,
            ttft_ms: distribution(&ttfts, percentiles),
            tpot_ms: distribution(&tpots, percentiles),
            itl_ms: distribution(&itls, percentiles),
            e2el_ms: distribution(&e2els, percentiles),
            beside_ttft: Default::default(),
        }
    }

    /// Requests that succeeded and met every goodput bound.
    pub fn good(&self) -> usize {
        self.completed()
            .filter(|r| {
                self.goodput.iter().all(|(k, ms)| {
                    let v = match k.as_str() {
                        "ttft" => Some(r.ttft),
                        "tpot" => r.tpot(),
                        _ => Some(r.latency),
                    };
                    v.is_none_or(|v| v * 1000.0 <= *ms)
                })
            })
            .count()
    }
}

/// Parses `--metric-percentiles`.
pub fn parse_percentiles(text: &str) -> Result<Vec<f64>, BenchError> {
    text.split(',')
        .map(|p| {
            p.trim()
                .parse::<f64>()
                .ok()
                .filter(|p| (0.0..=100.0).contains(p))
                .ok_or_else(|| {
                    BenchError::Usage(format!(
                        "--metric-percentiles: `{p}` is not a number in 0..=100"
                    ))
                })
        })
        .collect()
}

/// Parses `--goodput ttft:MS tpot:MS e2el:MS`.
pub fn parse_goodput(items: &[String]) -> Result<Vec<(String, f64)>, BenchError> {
    items
        .iter()
        .flat_map(|s| s.split_whitespace())
        .map(|item| {
            let (k, v) = item
                .split_once(':')
                .ok_or_else(|| BenchError::Usage(format!("--goodput: `{item}` is not NAME:MS")))?;
            if !matches!(k, "ttft" | "tpot" | "e2el") {
                return Err(BenchError::Usage(format!(
                    "--goodput: unknown figure `{k}` (ttft, tpot, e2el)"
                )));
            }
            let ms = v.parse::<f64>().ok().filter(|v| *v > 0.0).ok_or_else(|| {
                BenchError::Usage(format!("--goodput: `{v}` is not a positive number of ms"))
            })?;
            Ok((k.to_owned(), ms))
        })
        .collect()
}

fn request_body(args: &BenchArgs, chat: bool, s: &Sample) -> Bytes {
    let mut body = if chat {
        serde_json::json!({
            "model": args.model,
            "messages": [{"role": "user", "content": s.prompt}],
            "temperature": 0.0,
            "max_completion_tokens": s.output_len,
            "stream": true,
            "stream_options": {"include_usage": true},
        })
    } else {
        serde_json::json!({
            "model": args.model,
            "prompt": s.prompt,
            "temperature": 0.0,
            "max_tokens": s.output_len,
            "stream": true,
            "stream_options": {"include_usage": true},
        })
    };
    if args.ignore_eos {
        body["ignore_eos"] = serde_json::Value::Bool(true);
    }
    Bytes::from(body.to_string())
}

fn workload(args: &BenchArgs) -> Result<Vec<Sample>, BenchError> {
    match (&args.dataset_path, args.dataset_name) {
        (Some(path), _) => Ok(dataset::sharegpt(
            path,
            args.num_prompts,
            args.sharegpt_output_len,
            args.seed,
        )?),
        (None, DatasetName::Sharegpt) => Err(BenchError::Usage(
            "--dataset-name sharegpt needs --dataset-path".to_owned(),
        )),
        (None, DatasetName::Random) => Ok(dataset::random(
            args.num_prompts,
            args.random_input_len,
            args.random_output_len,
            args.random_range_ratio,
            args.seed,
        )),
    }
}

/// The connection pool of a run: it keeps up to `--max-concurrency` idle connections, so runs
/// that share it (see [`run_with`]) reuse the connections the earlier ones opened.
pub fn client(args: &BenchArgs) -> Result<HttpClient, BenchError> {
    build_client(args.max_concurrency.unwrap_or(args.num_prompts).max(1))
}

/// Body of the requests a [`HttpClient`] sends.
pub type ClientBody = Either<Full<Bytes>, hyper::body::Incoming>;

/// A pooled HTTP/1.1 client for `http://` and `https://` servers.
pub type HttpClient = hyper_util::client::legacy::Client<net::Connector, ClientBody>;

/// A client keeping up to `max_idle` idle connections per host for 90 s.
fn build_client(max_idle: usize) -> Result<HttpClient, BenchError> {
    let connector = net::connector(Duration::from_secs(5), None)
        .map_err(|e| BenchError::Usage(e.to_string()))?;
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(max_idle)
            .build(connector),
    )
}

/// Runs the workload on a pool of its own ([`client`]) and returns every request's
/// measurement.
pub async fn run(args: &BenchArgs) -> Result<BenchResult, BenchError> {
    run_with(&client(args)?, args).await
}

/// Sends `--num-warmups` requests, then runs the workload on `client`, and returns every
/// measured request's result. Prints a progress bar unless `--disable-tqdm` (or stderr is not a
/// terminal).
pub async fn run_with(client: &HttpClient, args: &BenchArgs) -> Result<BenchResult, BenchError> {
    let goodput = parse_goodput(&args.goodput)?;
    let positive = |v: f64| v > 0.0;
    if !positive(args.burstiness) || !positive(args.request_rate) {
        return Err(BenchError::Usage(
            "--request-rate and --burstiness must be positive".to_owned(),
        ));
    }
    if args.max_concurrency == Some(0) {
        return Err(BenchError::Usage(
            "--max-concurrency must be at least 1".to_owned(),
        ));
    }
    let backend = Backend::of(args);
    let endpoint = backend.endpoint(args);
    let dialect = backend.dialect();
    let url: http::Uri = format!("{}{}", args.base_url.trim_end_matches('/'), endpoint)
        .parse()
        .map_err(|e| BenchError::Usage(format!("--base-url/--endpoint: {e}")))?;
    let mut headers = http::HeaderMap::new();
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| BenchError::Usage(format!("--header `{h}` is not `Name: value`")))?;
        let name = HeaderName::from_bytes(k.trim().as_bytes())
            .map_err(|e| BenchError::Usage(format!("--header: {e}")))?;
        let value = HeaderValue::from_str(v.trim())
            .map_err(|e| BenchError::Usage(format!("--header: {e}")))?;
        headers.append(name, value);
    }
    let samples = workload(args)?;
    let limit = args.max_concurrency.map(|n| Arc::new(Semaphore::new(n)));
    let nonce: u32 = rand::random();
    if let Some(first) = samples.first().filter(|_| args.num_warmups > 0) {
        let body = backend.request_body(args, first);
        let mut warmups = tokio::task::JoinSet::new();
        for i in 0..args.num_warmups {
            let (client, url, headers, body, limit) = (
                client.clone(),
                url.clone(),
                headers.clone(),
                body.clone(),
                limit.clone(),
            );
            warmups.spawn(async move {
                let _permit = match &limit {
                    Some(s) => Some(s.acquire().await.expect("the semaphore is never closed")),
                    None => None,
                };
                let id = format!("tb-{nonce:08x}-warmup-{i}");
                let t = Instant::now();
                one_request(&client, url, headers, body, id, t, false, dialect).await;
            });
        }
        warmups.join_all().await;
    }
    let progress = if args.disable_tqdm {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(samples.len() as u64)
    };
    let mut gaps = SmallRng::seed_from_u64(args.seed);
    // Gamma with shape k and scale 1/(rate k) has mean 1/rate; k = 1 is a Poisson process.
    let gamma = args
        .request_rate
        .is_finite()
        .then(|| Gamma::new(args.burstiness, 1.0 / (args.request_rate * args.burstiness)))
        .transpose()
        .map_err(|e| BenchError::Usage(format!("--burstiness: {e}")))?;
    let started = Instant::now();
    let mut next = started;
    let mut tasks = Vec::with_capacity(samples.len());
    for (i, sample) in samples.iter().enumerate() {
        if let Some(g) = &gamma {
            next += Duration::from_secs_f64(g.sample(&mut gaps));
            tokio::time::sleep_until(next).await;
        }
        let request_id = format!("tb-{nonce:08x}-{i}");
        let body = backend.request_body(args, sample);
        let (client, url, headers, limit, progress) = (
            client.clone(),
            url.clone(),
            headers.clone(),
            limit.clone(),
            progress.clone(),
        );
        let prompt_len = sample.prompt_len as u64;
        let stamps = args.chunk_latency;
        tasks.push(tokio::spawn(async move {
            let _permit = match &limit {
                Some(s) => Some(
                    s.clone()
                        .acquire_owned()
                        .await
                        .expect("the semaphore is never closed"),
                ),
                None => None,
            };
            let mut r = one_request(
                &client, url, headers, body, request_id, started, stamps, dialect,
            )
            .await;
            if r.prompt_len == 0 {
                r.prompt_len = prompt_len;
            }
            progress.inc(1);
            r
        }));
    }
    let mut requests = Vec::with_capacity(tasks.len());
    for t in tasks {
        requests.push(t.await.unwrap_or_else(|e| RequestResult {
            error: format!("request task failed: {e}"),
            ..RequestResult::default()
        }));
    }
    progress.finish_and_clear();
    Ok(BenchResult {
        requests,
        duration: started.elapsed().as_secs_f64(),
        goodput,
    })
}

/// Sends one streaming request and times its events by `dialect`'s rules.
#[allow(clippy::too_many_arguments)]
async fn one_request(
    client: &HttpClient,
    url: http::Uri,
    headers: http::HeaderMap,
    body: Bytes,
    request_id: String,
    started: Instant,
    stamps: bool,
    dialect: Dialect,
) -> RequestResult {
    let mut out = RequestResult {
        request_id,
        ..RequestResult::default()
    };
    let mut req = Request::post(url)
        .body(Either::Left(Full::new(body)))
        .expect("URI and method are valid");
    *req.headers_mut() = headers;
    req.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&out.request_id) {
        req.headers_mut().insert("x-request-id", v);
    }
    let st = Instant::now();
    out.start_time = (st - started).as_secs_f64();
    let response = match client.request(req).await {
        Ok(r) => {
            out.local_addr = r
                .extensions()
                .get::<hyper_util::client::legacy::connect::HttpInfo>()
                .map(|info| info.local_addr());
            r
        }
        Err(e) => {
            out.error = format!("request failed: {e}");
            return out;
        }
    };
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let text = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        out.error = format!("HTTP {status}: {}", String::from_utf8_lossy(&text));
        return out;
    }
    // The proxy's own state machine: the same output events, TTFT, ITL and E2EL rules
    // (`docs/METRICS.md` §1–2, those of the current `vllm bench serve`), timed from the send.
    let mut parser = SseParser::new().with_dialect(dialect);
    let mut latency = Latency::new(st);
    let mut error = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                error = Some(format!("stream broke off: {e}"));
                break;
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let now = Instant::now();
        let wall = if stamps { unix_nanos() } else { 0 };
        latency.on_bytes(now);
        parser.feed(&data, |e| {
            match e.kind {
                EventKind::Token if stamps && e.choices.iter().any(|c| c.output) => {
                    if let Some(emitted) = emit_stamp(e.data) {
                        out.chunk_latency
                            .push(wall.saturating_sub(emitted) as f64 / 1e9);
                    }
                }
                EventKind::Error => error = Some("error event in the stream".to_owned()),
                _ => {}
            }
            latency.on_event(e, now, |o| {
                if let Observation::Itl(d) = o {
                    out.itl.push(d.as_secs_f64());
                }
            });
            if let Some(p) = e.usage.and_then(|u| u.prompt_tokens) {
                out.prompt_len = p;
            }
        });
    }
    let f = latency.figures(Instant::now());
    match (error, f.ttft) {
        (Some(e), _) => out.error = e,
        (None, None) => out.error = "no output event in the stream".to_owned(),
        (None, Some(ttft)) => {
            out.success = true;
            out.ttft = ttft.as_secs_f64();
            out.latency = f.e2el.as_secs_f64();
            out.output_tokens = f.output_tokens.unwrap_or(0);
            out.server_queue_time = f.queue.map(|d| d.as_secs_f64());
            out.server_ttft = f.prefill.map(|d| d.as_secs_f64());
            out.server_decode_time = f.decode.map(|d| d.as_secs_f64());
        }
    }
    out
}

/// Wall clock, ns since the Unix epoch.
fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The `"tokentap_emit_ns":N` stamp of a chunk (see `SimConfig::stamp_emit_time`).
fn emit_stamp(data: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"tokentap_emit_ns\":";
    let at = memchr::memmem::rfind(data, KEY)? + KEY.len();
    let digits = data[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut n: u64 = 0;
    let mut any = false;
    for d in digits {
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(n)
}

/// Percentiles (µs) of the one-way chunk latencies of all completed requests, with count,
/// mean and max; `None` when nothing was measured.
pub fn chunk_latency_summary(result: &BenchResult) -> Option<serde_json::Value> {
    let mut all: Vec<f64> = result
        .completed()
        .flat_map(|r| r.chunk_latency.iter().map(|s| s * 1e6))
        .collect();
    if all.is_empty() {
        return None;
    }
    all.sort_by(f64::total_cmp);
    let mean = all.iter().sum::<f64>() / all.len() as f64;
    Some(serde_json::json!({
        "count": all.len(),
        "mean": mean,
        "p50": percentile_sorted(&all, 50.0),
        "p90": percentile_sorted(&all, 90.0),
        "p99": percentile_sorted(&all, 99.0),
        "p99.9": percentile_sorted(&all, 99.9),
        "max": all[all.len() - 1],
    }))
}

/// Fetches `/stats?format=text` from a tokentap admin listener (for `tokentap stats`): of one
/// tenant (`*`: of each) when `tenant` is given.
pub async fn fetch_stats(admin: &str, tenant: Option<&str>) -> Result<String, BenchError> {
    let mut query = "format=text".to_owned();
    if let Some(tenant) = tenant {
        query.push_str("&tenant=");
        for b in tenant.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~*".contains(&b) {
                query.push(char::from(b));
            } else {
                query.push_str(&format!("%{b:02X}"));
            }
        }
    }
    let uri: http::Uri = format!("{}/stats?{query}", admin.trim_end_matches('/'))
        .parse()
        .map_err(|e| BenchError::Usage(format!("--admin: {e}")))?;
    let client = build_client(1)?;
    let req = Request::get(uri)
        .body(Either::Left(Full::new(Bytes::new())))
        .expect("URI and method are valid");
    let response = client
        .request(req)
        .await
        .map_err(|e| BenchError::Usage(format!("cannot reach {admin}: {e}")))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| BenchError::Usage(format!("reading {admin}/stats: {e}")))?
        .to_bytes();
    if !status.is_success() {
        return Err(BenchError::Usage(format!(
            "{admin}/stats answered {status}"
        )));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Prints the summary the way `vllm bench serve` does.
pub fn report(args: &BenchArgs, result: &BenchResult) -> Result<String, BenchError> {
    let percentiles = parse_percentiles(&args.metric_percentiles)?;
    let metrics: Vec<&str> = args
        .percentile_metrics
        .split(',')
        .map(str::trim)
        .filter(|m| ALL_METRICS.contains(m))
        .collect();
    let s = result.summary(&percentiles);
    let failed = result.requests.len() as u64 - s.completed;
    let mut extra = vec![("Failed requests:", failed.to_string())];
    if let Some(c) = args.max_concurrency {
        extra.push(("Maximum request concurrency:", c.to_string()));
    }
    let mut table = render_table("Serving Benchmark Result", &s, &extra, &metrics);
    if !result.goodput.is_empty() {
        let line = format!(
            "{:<40} {:<10.2}\n",
            "Request goodput (req/s):",
            result.good() as f64 / result.duration.max(1e-9)
        );
        if let Some(at) = table.find("Output token throughput") {
            table.insert_str(at, &line);
        }
    }
    if let Some(c) = chunk_latency_summary(result) {
        let f = |k: &str| c[k].as_f64().unwrap_or(0.0);
        table.push_str(&format!(
            "{:<40} {:<10}\n{:<40} {:<10.1}\n{:<40} {:<10.1}\n{:<40} {:<10.1}\n{:<40} {:<10.1}\n",
            "Stamped chunks:",
            c["count"],
            "Mean chunk latency (us):",
            f("mean"),
            "Median chunk latency (us):",
            f("p50"),
            "P99 chunk latency (us):",
            f("p99"),
            "P99.9 chunk latency (us):",
            f("p99.9"),
        ));
    }
    if failed > 0
        && let Some(first) = result.requests.iter().find(|r| !r.success)
    {
        table.push_str(&format!("first failure: {}\n", first.error));
    }
    Ok(table)
}

/// Writes `--save-result` JSON: the summary and per-request ttfts, itls, latencies, lengths.
pub fn save(args: &BenchArgs, result: &BenchResult) -> Result<PathBuf, BenchError> {
    let percentiles = parse_percentiles(&args.metric_percentiles)?;
    let s = result.summary(&percentiles);
    let path = args.result_filename.clone().unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        PathBuf::from(format!(
            "tokentap-bench-{}-{}qps-{secs}.json",
            args.model.replace('/', "_"),
            args.request_rate
        ))
    });
    let mut json = serde_json::json!({
        "endpoint": Backend::of(args).endpoint(args),
        "backend": Backend::of(args).path(),
        "base_url": args.base_url,
        "model_id": args.model,
        "num_prompts": args.num_prompts,
        "request_rate": if args.request_rate.is_finite() { serde_json::json!(args.request_rate) } else { serde_json::json!("inf") },
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "duration": result.duration,
        "completed": s.completed,
        "failed": result.requests.len() as u64 - s.completed,
        "total_input_tokens": s.total_input_tokens,
        "total_output_tokens": s.total_output_tokens,
        "request_throughput": s.request_throughput,
        "output_throughput": s.output_throughput,
        "total_token_throughput": s.total_token_throughput,
        "request_ids": result.requests.iter().map(|r| &r.request_id).collect::<Vec<_>>(),
        "input_lens": result.requests.iter().map(|r| r.prompt_len).collect::<Vec<_>>(),
        "output_lens": result.requests.iter().map(|r| r.output_tokens).collect::<Vec<_>>(),
        "ttfts": result.requests.iter().map(|r| r.ttft).collect::<Vec<_>>(),
        "itls": result.requests.iter().map(|r| &r.itl).collect::<Vec<_>>(),
        "latencies": result.requests.iter().map(|r| r.latency).collect::<Vec<_>>(),
        "start_times": result.requests.iter().map(|r| r.start_time).collect::<Vec<_>>(),
        "errors": result.requests.iter().map(|r| &r.error).collect::<Vec<_>>(),
    });
    // The server's own timings, when it reported them (vLLM `--enable-per-request-metrics`).
    if result
        .requests
        .iter()
        .any(|r| r.server_queue_time.is_some() || r.server_ttft.is_some())
    {
        json["server_queue_times"] = serde_json::json!(
            result
                .requests
                .iter()
                .map(|r| r.server_queue_time)
                .collect::<Vec<_>>()
        );
        json["server_ttfts"] = serde_json::json!(
            result
                .requests
                .iter()
                .map(|r| r.server_ttft)
                .collect::<Vec<_>>()
        );
    }
    if let Some(c) = chunk_latency_summary(result) {
        json["chunk_latency_us"] = c;
    }
    if !result.goodput.is_empty() {
        json["request_goodput"] =
            serde_json::json!(result.good() as f64 / result.duration.max(1e-9));
    }
    for (name, d) in [
        ("ttft", &s.ttft_ms),
        ("tpot", &s.tpot_ms),
        ("itl", &s.itl_ms),
        ("e2el", &s.e2el_ms),
    ] {
        json[format!("mean_{name}_ms")] = serde_json::json!(d.mean);
        json[format!("median_{name}_ms")] = serde_json::json!(d.median);
        json[format!("std_{name}_ms")] = serde_json::json!(d.std);
        for (p, v) in &d.percentiles {
            json[format!("p{}_{name}_ms", fmt_pct(*p))] = serde_json::json!(v);
        }
    }
    let text = serde_json::to_string_pretty(&json).unwrap_or_default();
    std::fs::write(&path, text).map_err(|source| BenchError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emit_stamps_are_read_from_the_end_of_a_chunk() {
        assert_eq!(
            emit_stamp(br#"{"choices":[],"tokentap_emit_ns":1735689600123456789}"#),
            Some(1_735_689_600_123_456_789)
        );
        assert_eq!(emit_stamp(br#"{"choices":[]}"#), None);
        assert_eq!(emit_stamp(br#"{"tokentap_emit_ns":x}"#), None);
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile_sorted(&v, 50.0), 2.5);
        assert!((percentile_sorted(&v, 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile_sorted(&v, 0.0), 1.0);
        assert_eq!(percentile_sorted(&[5.0], 99.0), 5.0);
        // distribution() sorts: unsorted input gives the same interpolation (seconds in, ms out).
        let d = distribution(&[0.004, 0.001, 0.003, 0.002], &[99.0]);
        assert!((d.percentiles[0].1 - 3.97).abs() < 1e-9);
        assert!((d.median - 2.5).abs() < 1e-9);
        let d = distribution(&[0.001, 0.003], &[50.0]);
        assert!((d.mean - 2.0).abs() < 1e-12);
        assert!((d.std - 1.0).abs() < 1e-12);
    }

    #[test]
    fn goodput_and_percentile_options_parse() {
        assert_eq!(
            parse_goodput(&["ttft:200".to_owned(), "tpot:20 e2el:5000".to_owned()]).unwrap(),
            vec![
                ("ttft".to_owned(), 200.0),
                ("tpot".to_owned(), 20.0),
                ("e2el".to_owned(), 5000.0)
            ]
        );
        assert!(parse_goodput(&["ttft=200".to_owned()]).is_err());
        assert!(parse_goodput(&["foo:1".to_owned()]).is_err());
        assert_eq!(parse_percentiles("50, 99.9").unwrap(), vec![50.0, 99.9]);
        assert!(parse_percentiles("101").is_err());
    }

    #[test]
    fn defaults_match_the_command_line() {
        let a = BenchArgs::new("http://x", "m");
        assert_eq!(a.num_prompts, 1000);
        assert!(a.request_rate.is_infinite());
        assert_eq!(a.metric_percentiles, "99");
    }
}
