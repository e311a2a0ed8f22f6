//! Telemetry per replica end to end: simulators behind one route, in-process on
//! `127.0.0.1:0`. Each upstream endpoint's TTFT, TPOT and E2EL histograms hold the requests it
//! answered, a retried request counts at the endpoint that answered it, and summed over the
//! endpoints they equal the main histograms exactly (the same figures, not a second
//! measurement).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokentap::Running;
use tokentap::config::Config;
use tokentap::simulate::Simulator;
use tokio::net::TcpListener;

const TTFT: &str = "tokentap_upstream_time_to_first_token_seconds";
const TPOT: &str = "tokentap_upstream_time_per_output_token_seconds";
const E2EL: &str = "tokentap_upstream_e2e_request_latency_seconds";

/// A proxy on free loopback ports with one `"*"` route over `upstreams`.
async fn routed(upstreams: &[String], balance: &str) -> Running {
    let toml = format!(
        "[[routes]]\nmodels = [\"*\"]\nupstreams = {upstreams:?}\nbalance = \"{balance}\"\n"
    );
    let mut c = Config::parse(&toml).expect("the route parses");
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    c.telemetry.models = vec![MODEL.to_owned()];
    c.telemetry.access_log = false;
    c.proxy.shutdown_grace_secs = 1.0;
    tokentap::start(c).await.expect("the proxy starts")
}

/// A simulator with a TTFT of `ttft_ms` that answers exactly 4 tokens.
async fn replica(ttft_ms: f64) -> Simulator {
    let mut c = exact_sim(ttft_ms, 2.0);
    c.output.min_tokens = 4;
    c.output.max_tokens = 4;
    sim(c).await
}

async fn metrics(proxy: &Running) -> String {
    scrape(proxy.admin_addr().unwrap()).await
}

/// `name_part` of one upstream's histogram.
fn at(text: &str, name: &str, part: &str, upstream: &str) -> f64 {
    value(text, &format!("{name}_{part}"), &[("upstream", upstream)])
}

/// The main histogram's `part`, summed over every series.
fn main_total(text: &str, name: &str, part: &str) -> f64 {
    value(text, &format!("{name}_{part}"), &[])
}

#[tokio::test]
async fn each_replica_has_the_latency_of_the_requests_it_answered() {
    let fast = replica(5.0).await;
    let slow = replica(300.0).await;
    let (fast_url, slow_url) = (fast.base_url(), slow.base_url());
    let proxy = routed(&[fast_url.clone(), slow_url.clone()], "round_robin").await;
    let url = format!("http://{}/v1/chat/completions", proxy.addr());
    for _ in 0..6 {
        let r = post(&client(), &url, &chat_body(4, true, "")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    // Non-streaming requests have an E2EL and no TTFT.
    for _ in 0..2 {
        let r = post(&client(), &url, &chat_body(4, false, "")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let text = metrics(&proxy).await;
    // Round robin: each replica answered three streams and one whole body (the simulators
    // count the proxy's /v1/models poll too, which is no generation).
    for upstream in [&fast_url, &slow_url] {
        assert_eq!(
            at(&text, TTFT, "count", upstream),
            3.0,
            "{upstream}\n{text}"
        );
        assert_eq!(at(&text, TPOT, "count", upstream), 3.0, "{upstream}");
        assert_eq!(at(&text, E2EL, "count", upstream), 4.0, "{upstream}");
    }
    // Every first token of the slow replica came after its 300 ms TTFT: none in a bucket at
    // or below 0.25 s.
    let slow_fast_buckets = value(
        &text,
        &format!("{TTFT}_bucket"),
        &[("upstream", &slow_url), ("le", "0.25")],
    );
    assert_eq!(slow_fast_buckets, 0.0);
    assert!(at(&text, TTFT, "sum", &slow_url) >= 3.0 * 0.3);
    // The same figures as the main histograms: their counts add up exactly, and their sums
    // too but for the order the samples were added in (float rounding).
    for (name, main) in [
        (TTFT, "tokentap_time_to_first_token_seconds"),
        (TPOT, "tokentap_time_per_output_token_seconds"),
        (E2EL, "tokentap_e2e_request_latency_seconds"),
    ] {
        let both = |part| at(&text, name, part, &fast_url) + at(&text, name, part, &slow_url);
        assert_eq!(both("count"), main_total(&text, main, "count"), "{name}");
        let (sum, main_sum) = (both("sum"), main_total(&text, main, "sum"));
        assert!(
            (sum - main_sum).abs() <= 1e-12 * main_sum,
            "{name}: {sum} != {main_sum}"
        );
    }
    // One label, from the configuration.
    for s in samples(&text).iter().filter(|s| s.name.starts_with(TTFT)) {
        let labels: Vec<&str> = s.labels.iter().map(|(k, _)| k.as_str()).collect();
        assert!(
            labels == ["upstream"] || labels == ["upstream", "le"],
            "{labels:?}"
        );
    }
    proxy.shutdown().await;
}

/// The URL of a loopback port nothing listens on (bound, then let go).
async fn closed_port() -> (String, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    (format!("http://{addr}"), addr)
}

#[tokio::test]
async fn a_retried_request_counts_at_the_replica_that_answered() {
    let (down, _) = closed_port().await;
    let up = replica(5.0).await;
    let proxy = routed(&[down.clone(), up.base_url()], "round_robin").await;
    // Wait for the first poll to find `down` refusing and for its first ejection (1 s) to
    // end, so that round robin sends requests to it again.
    let mut ejected = false;
    for _ in 0..500 {
        let text = metrics(&proxy).await;
        if value(
            &text,
            "tokentap_upstream_ejections_total",
            &[("upstream", &down)],
        ) == 1.0
        {
            ejected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ejected, "the poll never ejected {down}");
    tokio::time::sleep(Duration::from_millis(1050)).await;
    let url = format!("http://{}/v1/chat/completions", proxy.addr());
    for _ in 0..4 {
        let r = post(&client(), &url, &chat_body(4, true, "")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let text = metrics(&proxy).await;
    let retries = value(
        &text,
        "tokentap_upstream_retries_total",
        &[("upstream", &down)],
    );
    assert_eq!(retries, 1.0, "one request met the refusing replica\n{text}");
    // All four, the retried one included, are the answering replica's.
    for name in [TTFT, TPOT, E2EL] {
        assert_eq!(at(&text, name, "count", &up.base_url()), 4.0, "{name}");
        assert_eq!(at(&text, name, "count", &down), 0.0, "{name}");
    }
    proxy.shutdown().await;
}
