//! `tokentap bench` through the proxy, against each shape of server the simulator speaks, joined
//! per request with the proxy's access log: the same output events, the same TTFT and the same
//! decode time (E2EL − TTFT), on tokio's paused clock, where both sides see the same instants.
//!
//! Each flavor sends events that are not output where bench 0.33 does not count them (vLLM's
//! role chunk with the first token, llama.cpp's role chunk before it and its finish-only chunk at
//! the end); a proxy or a client that stamped one of them would be off by one ITL sample or a
//! whole decode step on every request.
//!
//! This binary installs a global log subscriber to read the access log.

mod common;

use std::collections::HashMap;

use common::*;
use tokentap::bench::{self, BenchArgs};
use tokentap::simulate::{Flavor, SimConfig};

type Line = HashMap<String, String>;

const TTFT_MS: f64 = 40.0;
const STEP_MS: f64 = 15.0;
const TOKENS: usize = 10;
const REQUESTS: usize = 12;

/// Runs bench through a proxy in front of `sim_config`; checks every request against its
/// access-log line and the simulator's timing model.
async fn agrees(name: &str, sim_config: SimConfig) {
    let lines = access_log();
    let sim = sim(sim_config).await;
    let mut config = proxy_config(&sim.base_url());
    config.telemetry.access_log = true;
    let proxy = tokentap::start(config).await.unwrap();
    let mut args = BenchArgs::new(&format!("http://{}", proxy.addr()), MODEL);
    args.num_prompts = REQUESTS;
    args.max_concurrency = Some(4);
    args.random_input_len = 32;
    args.random_output_len = TOKENS;
    args.ignore_eos = true;
    args.disable_tqdm = true;
    let result = bench::run(&args).await.unwrap();
    proxy.shutdown().await;
    sim.shutdown().await;

    let by_id: HashMap<String, Line> = lines
        .lock()
        .unwrap()
        .iter()
        .map(|l| (l["request_id"].clone(), l.clone()))
        .collect();
    assert_eq!(result.completed().count(), REQUESTS, "{name}");
    for r in result.completed() {
        let l = by_id
            .get(&r.request_id)
            .unwrap_or_else(|| panic!("{name}: no access-log line for {}", r.request_id));
        let ms = |k: &str| -> f64 {
            l.get(k)
                .unwrap_or_else(|| panic!("{name}: no {k} in {l:?}"))
                .parse()
                .unwrap()
        };
        assert_eq!(l["outcome"], "ok", "{name}");
        // One output event per token: TTFT, then one ITL sample per later token.
        assert_eq!(r.itl.len(), TOKENS - 1, "{name}: bench's ITL {:?}", r.itl);
        assert_eq!(l["itl_count"], (TOKENS - 1).to_string(), "{name}");
        assert_eq!(r.output_tokens, TOKENS as u64, "{name}");
        assert_eq!(l["output_tokens"], TOKENS.to_string(), "{name}");
        // The same instants on both sides of the proxy: the first and the last output event.
        let decode_bench = (r.latency - r.ttft) * 1e3;
        let decode_proxy = ms("e2el_ms") - ms("ttft_ms");
        let decode_model = (TOKENS - 1) as f64 * STEP_MS;
        assert!(
            (decode_bench - decode_model).abs() < 0.01,
            "{name}: bench's decode time {decode_bench} ms"
        );
        assert!(
            (decode_proxy - decode_model).abs() < 0.01,
            "{name}: the proxy's decode time {decode_proxy} ms"
        );
        assert!(
            (r.ttft * 1e3 - ms("ttft_ms")).abs() < 0.01,
            "{name}: TTFT {} ms at the client, {} at the proxy",
            r.ttft * 1e3,
            ms("ttft_ms")
        );
        assert!(
            r.itl.iter().all(|g| (g * 1e3 - STEP_MS).abs() < 0.01),
            "{name}: {:?}",
            r.itl
        );
    }
}

fn flavored(flavor: Flavor) -> SimConfig {
    let mut c = exact_sim(TTFT_MS, STEP_MS);
    c.flavor = flavor;
    c
}

#[tokio::test(start_paused = true)]
async fn vllm_shaped_streams_agree_per_request() {
    agrees("vllm", flavored(Flavor::Vllm)).await;
}

#[tokio::test(start_paused = true)]
async fn llama_cpp_shaped_streams_agree_per_request() {
    agrees("llama.cpp", flavored(Flavor::LlamaCpp)).await;
}

#[tokio::test(start_paused = true)]
async fn reasoning_streams_agree_per_request() {
    for flavor in [Flavor::Vllm, Flavor::LlamaCpp] {
        let mut c = flavored(flavor);
        c.reasoning_tokens = 4;
        agrees(&format!("{} reasoning", flavor.as_str()), c).await;
    }
}

#[tokio::test(start_paused = true)]
async fn tool_call_streams_agree_per_request() {
    for flavor in [Flavor::Vllm, Flavor::LlamaCpp] {
        let mut c = flavored(flavor);
        c.tool_calls = true;
        agrees(&format!("{} tool calls", flavor.as_str()), c).await;
    }
}

#[tokio::test(start_paused = true)]
async fn streams_with_per_request_metrics_agree_per_request() {
    let mut c = flavored(Flavor::Vllm);
    c.request_metrics = true;
    agrees("vllm with metrics", c).await;
}
