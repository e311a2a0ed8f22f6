//! Load check (ignored by default; run it in release):
//!
//! ```sh
//! cargo test --profile ci --test simulator_load -- --ignored --nocapture
//! SIM_STREAMS=5000 SIM_TOKENS=60 SIM_ITL_MS=50 SIM_RAMP_MS=1000 cargo test --profile ci --test simulator_load -- --ignored --nocapture
//! ```
//!
//! Opens many concurrent streams (one HTTP/1.1 connection each) against an in-process
//! simulator with exact timings and reports how late tokens arrive compared with the
//! schedule (TTFT + k x ITL). Client and server share the machine, so the figures include
//! the client's own work. Every token is one write to one socket: on a 2-core machine the
//! kernel's loopback TCP path, not the simulator, is the limit (about 100k events/s with the
//! client on the same cores; at 5,000 streams x 20 ms ITL, 250k events/s, everything lags).

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokentap::simulate::{SimConfig, Simulator, TimingConfig};
use tokio::time::Instant;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load check: run in release with --ignored"]
async fn many_concurrent_streams_stay_on_schedule() {
    let streams = env("SIM_STREAMS", 5000) as usize;
    let tokens = env("SIM_TOKENS", 60);
    let (ttft_ms, itl_ms) = (200.0, env("SIM_ITL_MS", 50) as f64);
    let config = SimConfig {
        seed: Some(1),
        timing: TimingConfig {
            ttft_base_ms: ttft_ms,
            prefill_ms_per_1k_tokens: 0.0,
            itl_ms,
            jitter: 0.0,
            slowdown_per_seq: 0.0,
            max_num_seqs: 100_000,
            tokens_per_chunk: 1,
        },
        ..SimConfig::default()
    };
    // SIM_URL: measure an already running simulator (e.g. `tokentap simulate --config
    // FILE` with the timings above) so that client and server CPU can be told apart.
    let external = std::env::var("SIM_URL").ok();
    let sim = Simulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let base = external.unwrap_or_else(|| sim.base_url());
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(streams)
        .build_http::<Full<Bytes>>();
    let url = format!("{base}/v1/chat/completions");
    let body = Bytes::from(format!(
        "{{\"model\":\"Qwen/Qwen2.5-7B-Instruct\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"stream\":true,\"max_tokens\":{tokens}}}"
    ));
    // Open the connections first (pooled, then reused), so that connection setup (the accept
    // backlog, SYN retries) does not count as lateness.
    let mut warm = Vec::with_capacity(streams);
    for _ in 0..streams {
        let client = client.clone();
        let url = url.clone();
        // A full response takes TTFT to come, so every warm-up request needs its own connection.
        let body = Bytes::from_static(
            b"{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":1}",
        );
        warm.push(tokio::spawn(async move {
            let req = Request::post(url)
                .header("content-type", "application/json")
                .body(Full::new(body))
                .unwrap();
            let resp = client.request(req).await.unwrap();
            resp.into_body().collect().await.unwrap();
        }));
    }
    for w in warm {
        w.await.unwrap();
    }
    // Arrivals spread evenly over SIM_RAMP_MS (all at once with 0: the worst case, every
    // stream's tokens due in the same millisecond).
    let ramp = Duration::from_millis(env("SIM_RAMP_MS", 1000));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(streams);
    for i in 0..streams {
        let start_at = started + ramp * i as u32 / streams as u32;
        let client = client.clone();
        let req = Request::post(&url)
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))
            .unwrap();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start_at).await;
            let t0 = Instant::now();
            let resp = client.request(req).await.unwrap();
            let mut body = resp.into_body();
            // Lateness (ms) of each frame: arrival minus when its last token was due.
            let mut late = Vec::with_capacity(tokens as usize + 2);
            let mut seen: u64 = 0;
            while let Some(frame) = body.frame().await {
                let frame = frame.unwrap();
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                let at = t0.elapsed().as_secs_f64() * 1000.0;
                // Count token events (the role chunk shares the first token's frame).
                let events = data.windows(6).filter(|w| w == b"data: ").count() as u64;
                let tokens_in = if seen == 0 {
                    events.saturating_sub(1)
                } else {
                    events
                };
                if data.ends_with(b"[DONE]\n\n") {
                    break;
                }
                seen += tokens_in;
                if tokens_in > 0 {
                    let due = ttft_ms + itl_ms * (seen - 1) as f64;
                    late.push(at - due);
                }
            }
            assert_eq!(seen, tokens);
            late
        }));
    }
    let mut all = Vec::new();
    let mut first = Vec::new();
    for t in tasks {
        let late = t.await.unwrap();
        first.push(late[0]);
        all.extend(late);
    }
    let elapsed = started.elapsed();
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[((v.len() - 1) as f64 * p) as usize]
    };
    println!(
        "{streams} streams x {tokens} tokens in {elapsed:?}; lateness ms: \
         all p50 {:.2} p99 {:.2} max {:.2}; first token p50 {:.2} p99 {:.2} max {:.2}",
        pct(&mut all, 0.5),
        pct(&mut all, 0.99),
        pct(&mut all, 1.0),
        pct(&mut first, 0.5),
        pct(&mut first, 0.99),
        pct(&mut first, 1.0),
    );
    let stats = sim.stats();
    if base == sim.base_url() {
        assert_eq!(stats.completed, 2 * streams as u64, "{stats:?}");
        assert_eq!(stats.cancelled, 0);
    }
    // Typical tokens are on time; the tail depends on how busy the machine is.
    assert!(
        pct(&mut all, 0.5) < 20.0,
        "median lateness above 20 ms (machine overloaded?)"
    );
    sim.shutdown().await;
}
