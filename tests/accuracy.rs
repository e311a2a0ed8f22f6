//! The proxy's numbers agree with a client's: `tokentap bench` sends 100 concurrent streams
//! through the proxy; its per-request results are joined with the proxy's access log by
//! request id, and its summary table is compared with the proxy's `/stats`.
//!
//! This file holds one test: it installs a global log subscriber to read the access log.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::*;
use tokentap::bench::{self, BenchArgs};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};

type Lines = Arc<Mutex<Vec<HashMap<String, String>>>>;

/// Keeps every `tokentap::access` event's fields.
struct Capture(Lines);

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

// Four workers for three independent parts (simulator, proxy, client) in one process.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_and_client_agree_per_request_and_in_the_table() {
    let lines: Lines = Arc::default();
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(Capture(lines.clone())),
    )
    .expect("the only subscriber of this test binary");

    // The simulator's realistic defaults: jitter, continuous-batching slowdown.
    let sim = sim(tokentap::simulate::SimConfig {
        models: vec![MODEL.to_owned()],
        ..Default::default()
    })
    .await;
    let mut config = proxy_config(&sim.base_url());
    config.telemetry.access_log = true;
    let proxy = tokentap::start(config).await.unwrap();

    let mut args = BenchArgs::new(&format!("http://{}", proxy.addr()), MODEL);
    args.num_prompts = 400;
    args.max_concurrency = Some(100);
    // Poisson arrivals at a rate that keeps 100 streams in flight once it has ramped up (a
    // request lasts about 1.4 s), rather than 100 connections opened in the same instant.
    args.request_rate = 80.0;
    args.random_input_len = 256;
    args.random_output_len = 64;
    args.random_range_ratio = 0.5;
    args.disable_tqdm = true;
    args.headers = vec!["Authorization: Bearer sk-never-logged".to_owned()];
    let result = bench::run(&args).await.unwrap();
    assert_eq!(result.completed().count(), 400);

    let by_id: HashMap<String, HashMap<String, String>> = lines
        .lock()
        .unwrap()
        .iter()
        .map(|l| (l["request_id"].clone(), l.clone()))
        .collect();
    for line in lines.lock().unwrap().iter() {
        assert!(
            line.values().all(|v| !v.contains("sk-never-logged")),
            "the access log holds a secret: {line:?}"
        );
    }
    let ms = |l: &HashMap<String, String>, k: &str| -> f64 { l[k].parse().unwrap() };
    // The first request on each client connection opened it.
    let mut first_on: HashMap<std::net::SocketAddr, (f64, &str)> = HashMap::new();
    for r in result.completed() {
        let addr = r
            .local_addr
            .expect("hyper reports the connection's address");
        let first = first_on
            .entry(addr)
            .or_insert((r.start_time, &r.request_id));
        if r.start_time < first.0 {
            *first = (r.start_time, &r.request_id);
        }
    }
    let opened: std::collections::HashSet<&str> = first_on.values().map(|&(_, id)| id).collect();
    // Requests on a reused connection must agree within 1 ms (TTFT, E2EL). One that opened its
    // connection counts the connect and the proxy's first read of it on the client's clock only
    // (the proxy's clock starts at the request), so its client figures may be larger by that
    // setup, never smaller: the proxy must not report more than the client saw.
    let (mut reused, mut ttft_ok, mut e2el_ok, mut itl_ok) = (0, 0, 0, 0);
    let (mut ttft_max, mut e2el_max, mut itl_max, mut setup_max) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for r in result.completed() {
        let l = by_id
            .get(&r.request_id)
            .unwrap_or_else(|| panic!("no access-log line for {}", r.request_id));
        assert_eq!(l["outcome"], "ok");
        assert_eq!(l["output_tokens"], r.output_tokens.to_string());
        let ttft_gap = r.ttft * 1000.0 - ms(l, "ttft_ms");
        let e2el_gap = r.latency * 1000.0 - ms(l, "e2el_ms");
        let client_itl = r.itl.iter().sum::<f64>() / r.itl.len() as f64 * 1000.0;
        let d_itl = (ms(l, "itl_mean_ms") - client_itl).abs();
        itl_ok += usize::from(d_itl < 0.5);
        itl_max = itl_max.max(d_itl);
        if opened.contains(r.request_id.as_str()) {
            for (what, gap) in [("TTFT", ttft_gap), ("E2EL", e2el_gap)] {
                assert!(
                    (-1.0..50.0).contains(&gap),
                    "{} opened a connection: client {what} exceeds the proxy's by {gap:.3} ms",
                    r.request_id
                );
            }
            setup_max = setup_max.max(ttft_gap);
            continue;
        }
        reused += 1;
        ttft_ok += usize::from(ttft_gap.abs() < 1.0);
        e2el_ok += usize::from(e2el_gap.abs() < 1.0);
        ttft_max = ttft_max.max(ttft_gap.abs());
        e2el_max = e2el_max.max(e2el_gap.abs());
    }
    println!(
        "per request (400 requests, 100 concurrent; {reused} on a reused connection): TTFT within 1 ms: {ttft_ok}, E2EL within 1 ms: {e2el_ok}, largest differences {ttft_max:.3} / {e2el_max:.3} ms; mean ITL within 0.5 ms: {itl_ok}/400, largest {itl_max:.3} ms; connection setup seen by the client only: up to {setup_max:.3} ms"
    );
    assert!(
        reused >= 200,
        "most requests reuse a connection; {reused}/400 did"
    );
    assert!(
        ttft_ok * 100 >= reused * 99,
        "TTFT agreed within 1 ms for only {ttft_ok}/{reused}"
    );
    assert!(
        e2el_ok * 100 >= reused * 99,
        "E2EL agreed within 1 ms for only {e2el_ok}/{reused}"
    );
    assert!(
        itl_ok >= 396,
        "mean ITL agreed within 0.5 ms for only {itl_ok}/400"
    );

    let pcts = [50.0, 90.0, 99.0];
    let client = result.summary(&pcts);
    let report = proxy
        .telemetry()
        .stats
        .report(tokio::time::Instant::now(), &pcts);
    let server = &report.models[MODEL];
    assert_eq!(server.completed, 400);
    assert_eq!(server.total_output_tokens, client.total_output_tokens);
    for (name, c, s) in [
        ("TTFT", &client.ttft_ms, &server.ttft_ms),
        ("TPOT", &client.tpot_ms, &server.tpot_ms),
        ("ITL", &client.itl_ms, &server.itl_ms),
        ("E2EL", &client.e2el_ms, &server.e2el_ms),
    ] {
        let mut pairs = vec![("mean", c.mean, s.mean), ("median", c.median, s.median)];
        for ((p, vc), (_, vs)) in c.percentiles.iter().zip(&s.percentiles) {
            pairs.push((
                if *p == 90.0 {
                    "p90"
                } else if *p == 99.0 {
                    "p99"
                } else {
                    "p50"
                },
                *vc,
                *vs,
            ));
        }
        for (what, vc, vs) in pairs {
            let rel = (vs - vc).abs() / vc.max(1e-9);
            println!(
                "{name} {what}: client {vc:.3} ms, proxy {vs:.3} ms, {:.2}%",
                rel * 100.0
            );
            // ITL's median sits where most gaps are 0 or one step: compare those in absolute terms.
            assert!(
                rel <= 0.02 || (vs - vc).abs() < 0.1,
                "{name} {what}: client {vc} vs proxy {vs}"
            );
        }
    }
    proxy.shutdown().await;
    sim.shutdown().await;
}
