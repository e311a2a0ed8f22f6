//! OTLP metrics under the GenAI semantic-convention names, checked end to end against OTLP
//! receivers tokentap did not write: `fake-opentelemetry-collector` (OTLP/gRPC, in-process) and
//! `oteltap` from PyPI (OTLP/HTTP protobuf, a child process printing what it gets as JSON). The
//! proxy runs in-process in front of the simulator; the figures the collector gets are compared
//! with the Prometheus series of the same requests, which come from the same report.

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::otlp::{Oteltap, case_env, child_test, dead_endpoint};
use common::*;
use fake_opentelemetry_collector::{ExportedMetric, FakeCollectorServer};
use tokentap::config::{Config, OtlpMetricsConfig, Protocol, Temporality};
use tokentap::telemetry::otlp_metrics::{
    CHUNK_BATCH, DURATION_ADVICE, TOKEN_ADVICE, TPOT_ADVICE, TTFT_ADVICE, names,
};
use tokio::time::Instant;

/// One histogram data point as the collector got it.
#[derive(Clone, Debug)]
struct Point {
    name: String,
    unit: String,
    attrs: BTreeMap<String, String>,
    count: u64,
    sum: f64,
    bounds: Vec<f64>,
    /// 1: delta, 2: cumulative.
    temporality: i32,
}

/// The collector prints attribute values as `Some(AnyValue { value: Some(StringValue("x")) })`.
fn plain(debug: &str) -> String {
    for kind in ["StringValue(", "IntValue(", "DoubleValue(", "BoolValue("] {
        if let Some(i) = debug.find(kind) {
            let rest = &debug[i + kind.len()..];
            let end = rest.find(')').unwrap_or(rest.len());
            return rest[..end].trim_matches('"').to_owned();
        }
    }
    debug.to_owned()
}

fn points(exports: &[ExportedMetric]) -> Vec<Point> {
    // The collector's data enum is not exported by name: read it through its serde form.
    let mut out = Vec::new();
    for export in exports {
        let export = serde_json::to_value(export).unwrap();
        for m in export["metrics"].as_array().unwrap() {
            let name = m["name"].as_str().unwrap().to_owned();
            let h = &m["data"]["Histogram"];
            assert!(h.is_object(), "{name} is not a histogram: {m}");
            for p in h["data_points"].as_array().unwrap() {
                out.push(Point {
                    name: name.clone(),
                    unit: m["unit"].as_str().unwrap().to_owned(),
                    attrs: p["attributes"]
                        .as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), plain(v.as_str().unwrap())))
                        .collect(),
                    count: p["count"].as_u64().unwrap(),
                    sum: p["sum"].as_f64().unwrap_or(f64::NAN),
                    bounds: p["explicit_bounds"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|b| b.as_f64().unwrap())
                        .collect(),
                    temporality: h["aggregation_temporality"].as_i64().unwrap() as i32,
                });
            }
        }
    }
    out
}

/// Every export the collector gets until `done` holds for the points so far, or `within`.
async fn collect(
    collector: &mut FakeCollectorServer,
    within: Duration,
    done: impl Fn(&[Point]) -> bool,
) -> Vec<Point> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    loop {
        got.extend(points(
            &collector
                .exported_metrics(1, Duration::from_millis(100))
                .await,
        ));
        if done(&got) || Instant::now() >= deadline {
            return got;
        }
    }
}

/// The points of the latest export of `name` whose attributes include `want` (cumulative:
/// the latest export holds everything so far).
fn latest<'a>(got: &'a [Point], name: &str, want: &[(&str, &str)]) -> Vec<&'a Point> {
    let matching: Vec<&Point> = got
        .iter()
        .filter(|p| p.name == name)
        .filter(|p| {
            want.iter()
                .all(|(k, v)| p.attrs.get(*k).is_some_and(|a| a == v))
        })
        .collect();
    // One point per attribute set: the last one seen.
    let mut by_attrs: BTreeMap<String, &Point> = BTreeMap::new();
    for p in matching {
        by_attrs.insert(format!("{:?}", p.attrs), p);
    }
    by_attrs.into_values().collect()
}

fn total(points: &[&Point]) -> (u64, f64) {
    (
        points.iter().map(|p| p.count).sum(),
        points.iter().map(|p| p.sum).sum(),
    )
}

fn metrics_config(protocol: Protocol, endpoint: String) -> OtlpMetricsConfig {
    OtlpMetricsConfig {
        enabled: true,
        protocol: Some(protocol),
        endpoint: Some(endpoint),
        interval_secs: Some(0.2),
        timeout_secs: Some(5.0),
        ..OtlpMetricsConfig::default()
    }
}

fn config(upstream: &str, metrics: OtlpMetricsConfig) -> Config {
    let mut c = proxy_config(upstream);
    c.otlp_metrics = metrics;
    c
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(1.0)
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn grpc_genai_metrics_carry_the_prometheus_figures() {
    let mut collector = FakeCollectorServer::start().await.expect("fake collector");
    let sim = sim(exact_sim(20.0, 5.0)).await;
    let port = sim.base_url().rsplit(':').next().unwrap().to_owned();
    let proxy = tokentap::start(config(
        &sim.base_url(),
        metrics_config(Protocol::Grpc, collector.endpoint()),
    ))
    .await
    .unwrap();
    // A proxy in front of nothing: its requests end in `connect_error`.
    let dead = tokentap::start(config(
        "http://127.0.0.1:9",
        metrics_config(Protocol::Grpc, collector.endpoint()),
    ))
    .await
    .unwrap();
    let c = client();
    let chat = format!("http://{}/v1/chat/completions", proxy.addr());
    for n in [8, 16, 4] {
        assert_eq!(post(&c, &chat, &chat_body(n, true, "")).await.status, 200);
    }
    let completions = format!("http://{}/v1/completions", proxy.addr());
    assert_eq!(
        post(&c, &completions, &completions_body(5, false, ""))
            .await
            .status,
        200
    );
    let r = post(
        &c,
        &format!("http://{}/v1/chat/completions", dead.addr()),
        &chat_body(4, true, ""),
    )
    .await;
    assert_eq!(r.status, 502);

    let got = collect(&mut collector, Duration::from_secs(20), |got| {
        let ok = total(&latest(got, names::REQUEST_DURATION, &[])).0;
        ok >= 5
    })
    .await;
    let prom = scrape(proxy.admin_addr().unwrap()).await;
    let model = [("model", MODEL)];

    // Names, units and the conventions' bucket advice.
    for (name, unit, bounds) in [
        (names::TTFT, "s", TTFT_ADVICE),
        (names::TPOT, "s", TPOT_ADVICE),
        (names::REQUEST_DURATION, "s", DURATION_ADVICE),
        (names::TIME_TO_FIRST_CHUNK, "s", DURATION_ADVICE),
        (names::TIME_PER_OUTPUT_CHUNK, "s", DURATION_ADVICE),
        (names::TOKEN_USAGE, "{token}", TOKEN_ADVICE),
    ] {
        let points = latest(&got, name, &[]);
        assert!(!points.is_empty(), "no {name} in {got:#?}");
        for p in points {
            assert_eq!(p.unit, unit, "{name}");
            assert_eq!(p.bounds, bounds, "{name}");
            assert_eq!(p.temporality, 2, "{name} is cumulative by default");
            assert_eq!(p.attrs["gen_ai.provider.name"], "vllm");
            assert_eq!(p.attrs["gen_ai.request.model"], MODEL);
            assert_eq!(p.attrs["server.address"], "127.0.0.1");
        }
    }

    // The successful requests, at the proxy that reached the simulator.
    let here = [("server.port", port.as_str())];
    let chat_ok = [
        ("server.port", port.as_str()),
        ("gen_ai.operation.name", "chat"),
    ];
    let completion_ok = [
        ("server.port", port.as_str()),
        ("gen_ai.operation.name", "text_completion"),
    ];
    for p in latest(&got, names::REQUEST_DURATION, &here) {
        assert!(!p.attrs.contains_key("error.type"), "{p:?}");
    }
    // E2EL of every ok request: the same figures as Prometheus, to the last bit of the sum.
    let (n, sum) = total(&latest(&got, names::REQUEST_DURATION, &here));
    assert_eq!(n, 4);
    assert_eq!(
        n as f64,
        value(&prom, "tokentap_e2e_request_latency_seconds_count", &model)
    );
    assert!(close(
        sum,
        value(&prom, "tokentap_e2e_request_latency_seconds_sum", &model)
    ));
    let (n, sum) = total(&latest(&got, names::TTFT, &here));
    assert_eq!(
        n as f64,
        value(&prom, "tokentap_time_to_first_token_seconds_count", &model)
    );
    assert!(n >= 3);
    assert!(close(
        sum,
        value(&prom, "tokentap_time_to_first_token_seconds_sum", &model)
    ));
    let (n, sum) = total(&latest(&got, names::TPOT, &here));
    assert_eq!(
        n as f64,
        value(
            &prom,
            "tokentap_time_per_output_token_seconds_count",
            &model
        )
    );
    assert!(close(
        sum,
        value(&prom, "tokentap_time_per_output_token_seconds_sum", &model)
    ));
    // The simulator waits 20 ms before the first token: no chat TTFT can be shorter.
    let ttft = latest(&got, names::TTFT, &chat_ok);
    assert_eq!(total(&ttft).0, 3);
    assert!(ttft.iter().all(|p| p.sum >= 3.0 * 0.020), "{ttft:?}");
    // Streams only: the three chat streams, not the JSON completion.
    assert_eq!(
        total(&latest(&got, names::TIME_TO_FIRST_CHUNK, &chat_ok)).0,
        3
    );
    assert_eq!(
        total(&latest(&got, names::TIME_TO_FIRST_CHUNK, &completion_ok)).0,
        0
    );
    // Every ITL sample of the three streams (7 + 15 + 3), the same as Prometheus's.
    let (n, sum) = total(&latest(&got, names::TIME_PER_OUTPUT_CHUNK, &chat_ok));
    assert_eq!(n, 7 + 15 + 3);
    assert_eq!(
        n as f64,
        value(&prom, "tokentap_inter_token_latency_seconds_count", &model)
    );
    assert!(close(
        sum,
        value(&prom, "tokentap_inter_token_latency_seconds_sum", &model)
    ));
    assert!(latest(&got, names::TIME_PER_OUTPUT_CHUNK, &completion_ok).is_empty());
    // Tokens: exactly what was asked for, and the same as the Prometheus counters.
    let output = latest(&got, names::TOKEN_USAGE, &[("gen_ai.token.type", "output")]);
    let (n, sum) = total(&output);
    assert_eq!((n, sum), (4, (8 + 16 + 4 + 5) as f64));
    assert_eq!(
        sum,
        value(&prom, "tokentap_generation_tokens_total", &model)
    );
    let input = latest(&got, names::TOKEN_USAGE, &[("gen_ai.token.type", "input")]);
    let (n, sum) = total(&input);
    assert_eq!(n, 4);
    assert_eq!(sum, value(&prom, "tokentap_prompt_tokens_total", &model));

    // The request that failed: its duration with `error.type`, and no TTFT.
    let failed = latest(
        &got,
        names::REQUEST_DURATION,
        &[("server.port", "9"), ("error.type", "connect_error")],
    );
    assert_eq!(total(&failed).0, 1, "{got:#?}");
    assert_eq!(failed[0].attrs["gen_ai.operation.name"], "chat");
    assert!(latest(&got, names::TTFT, &[("server.port", "9")]).is_empty());

    for p in [proxy, dead] {
        assert_eq!(
            value(
                &scrape(p.admin_addr().unwrap()).await,
                names::EXPORTS_FAILED,
                &[]
            ),
            0.0
        );
        p.shutdown().await;
    }
    sim.shutdown().await;
}

/// The time per output chunk gets exactly the ITL samples of every stream, on tokio's paused
/// clock: a short stream, one longer than two batches (recorded mid-stream as well as at the
/// end), and one that breaks off after a batch was recorded (its samples count, with no
/// `error.type`). A JSON answer has none.
#[tokio::test(start_paused = true)]
async fn time_per_output_chunk_gets_every_itl_sample() {
    const ITL: f64 = 0.005;
    let mut collector = FakeCollectorServer::start().await.expect("fake collector");
    let sim = sim(exact_sim(50.0, ITL * 1000.0)).await;
    let proxy = tokentap::start(config(
        &sim.base_url(),
        metrics_config(Protocol::Grpc, collector.endpoint()),
    ))
    .await
    .unwrap();
    let c = client();
    let chat = format!("http://{}/v1/chat/completions", proxy.addr());
    let long = 2 * CHUNK_BATCH as u32 + 88;
    for n in [10, long] {
        let r = post(&c, &chat, &chat_body(n, true, "")).await;
        assert_eq!(r.status, 200);
    }
    let completions = format!("http://{}/v1/completions", proxy.addr());
    let r = post(&c, &completions, &completions_body(20, false, "")).await;
    assert_eq!(r.status, 200);
    let broken = CHUNK_BATCH as u32 + 30;
    let req = http::Request::post(&chat)
        .header("content-type", "application/json")
        .header("x-tokentap-sim-fault", format!("disconnect_after={broken}"))
        .body(http_body_util::Full::new(bytes::Bytes::from(chat_body(
            broken + 50,
            true,
            "",
        ))))
        .unwrap();
    let body = c.request(req).await.unwrap().into_body();
    assert!(
        http_body_util::BodyExt::collect(body).await.is_err(),
        "the stream breaks off"
    );

    let prom = scrape(proxy.admin_addr().unwrap()).await;
    let model = [("model", MODEL)];
    let itl_count = value(&prom, "tokentap_inter_token_latency_seconds_count", &model);
    let want = (10 - 1) + (long - 1) + (broken - 1);
    assert_eq!(itl_count, f64::from(want), "the proxy's own ITL samples");
    let got = collect(&mut collector, Duration::from_secs(60), |got| {
        total(&latest(got, names::TIME_PER_OUTPUT_CHUNK, &[])).0 >= u64::from(want)
    })
    .await;
    let points = latest(&got, names::TIME_PER_OUTPUT_CHUNK, &[]);
    // One attribute set: the breaking stream's samples join the others', no `error.type`.
    assert_eq!(points.len(), 1, "{points:#?}");
    let p = points[0];
    assert_eq!(p.unit, "s");
    assert_eq!(p.bounds, DURATION_ADVICE);
    assert_eq!(p.attrs["gen_ai.operation.name"], "chat");
    assert_eq!(p.attrs["gen_ai.request.model"], MODEL);
    assert_eq!(p.attrs["gen_ai.provider.name"], "vllm");
    assert!(!p.attrs.contains_key("error.type"), "{p:?}");
    // Exactly the samples: every gap is the simulator's 5 ms on the paused clock.
    assert_eq!(p.count, u64::from(want));
    assert!(
        close(p.sum, f64::from(want) * ITL),
        "{} != {}",
        p.sum,
        f64::from(want) * ITL
    );
    assert!(close(
        p.sum,
        value(&prom, "tokentap_inter_token_latency_seconds_sum", &model)
    ));
    // The stream that broke off ended `upstream_disconnect`: its duration says so.
    let failed = latest(
        &got,
        names::REQUEST_DURATION,
        &[("error.type", "upstream_disconnect")],
    );
    assert_eq!(total(&failed).0, 1, "{got:#?}");
    proxy.shutdown().await;
    sim.shutdown().await;
}

/// Delta points cover one interval each, and add up to the requests; cumulative ones grow.
#[tokio::test]
async fn delta_and_cumulative_temporality() {
    for temporality in [Temporality::Delta, Temporality::Cumulative] {
        let mut collector = FakeCollectorServer::start().await.expect("fake collector");
        let sim = sim(exact_sim(5.0, 1.0)).await;
        let mut metrics = metrics_config(Protocol::Grpc, collector.endpoint());
        metrics.temporality = Some(temporality);
        let proxy = tokentap::start(config(&sim.base_url(), metrics))
            .await
            .unwrap();
        let c = client();
        let url = format!("http://{}/v1/chat/completions", proxy.addr());
        let mut got = Vec::new();
        for round in 1..=2u64 {
            for _ in 0..round {
                assert_eq!(post(&c, &url, &chat_body(2, true, "")).await.status, 200);
            }
            // Wait until an export after this round is in.
            let seen = got.len();
            got.extend(
                collect(&mut collector, Duration::from_secs(10), |new| {
                    new.iter().any(|p| p.name == names::REQUEST_DURATION)
                })
                .await,
            );
            assert!(got.len() > seen, "round {round}: nothing exported");
        }
        proxy.shutdown().await;
        got.extend(collect(&mut collector, Duration::from_millis(300), |_| false).await);
        let durations: Vec<&Point> = got
            .iter()
            .filter(|p| p.name == names::REQUEST_DURATION)
            .collect();
        let counts: Vec<u64> = durations.iter().map(|p| p.count).collect();
        match temporality {
            Temporality::Delta => {
                assert!(durations.iter().all(|p| p.temporality == 1));
                assert_eq!(counts.iter().sum::<u64>(), 3, "{counts:?}");
            }
            _ => {
                assert!(durations.iter().all(|p| p.temporality == 2));
                assert_eq!(counts.last(), Some(&3), "{counts:?}");
                assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
            }
        }
        sim.shutdown().await;
    }
}

/// A refusing or hanging collector: requests go on as fast as without metrics, the failures are
/// counted, and shutdown does not wait for the collector.
async fn check_collector_down(hanging: bool) {
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", collector.local_addr().unwrap());
    let held = Arc::new(Mutex::new(Vec::new()));
    if hanging {
        let held = held.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = collector.accept().await {
                held.lock().unwrap().push(s);
            }
        });
    } else {
        drop(collector);
    }
    let sim = sim(exact_sim(20.0, 5.0)).await;
    let mut metrics = metrics_config(Protocol::Grpc, endpoint);
    metrics.interval_secs = Some(0.05);
    metrics.timeout_secs = Some(0.3);
    let plain = tokentap::start(proxy_config(&sim.base_url()))
        .await
        .unwrap();
    let proxy = tokentap::start(config(&sim.base_url(), metrics))
        .await
        .unwrap();
    let c = client();
    let mut slowest = [Duration::ZERO; 2];
    for _ in 0..12 {
        for (i, p) in [&plain, &proxy].into_iter().enumerate() {
            let t = Instant::now();
            let r = post(
                &c,
                &format!("http://{}/v1/chat/completions", p.addr()),
                &chat_body(4, true, ""),
            )
            .await;
            assert_eq!(r.status, 200);
            slowest[i] = slowest[i].max(t.elapsed());
        }
    }
    // An export on the request path would add its whole timeout to a request.
    assert!(
        slowest[1] < slowest[0] + Duration::from_millis(500),
        "with metrics {:?} vs plain {:?}",
        slowest[1],
        slowest[0]
    );
    let admin = proxy.admin_addr().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while value(&scrape(admin).await, names::EXPORTS_FAILED, &[]) < 2.0 {
        assert!(Instant::now() < deadline, "no failed export was counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = Instant::now();
    proxy.shutdown().await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t.elapsed()
    );
    plain.shutdown().await;
    sim.shutdown().await;
    if hanging {
        assert!(!held.lock().unwrap().is_empty(), "the exporter did try");
    }
}

#[tokio::test]
async fn collector_refusing_counts_failed_exports() {
    check_collector_down(false).await;
}

#[tokio::test]
async fn collector_hanging_counts_failed_exports() {
    check_collector_down(true).await;
}

#[tokio::test]
async fn off_builds_nothing_and_bad_settings_are_refused() {
    let sim = sim(exact_sim(5.0, 1.0)).await;
    let proxy = tokentap::start(proxy_config(&sim.base_url()))
        .await
        .unwrap();
    assert!(proxy.telemetry().otlp_metrics().is_none());
    proxy.shutdown().await;
    for (metrics, field) in [
        (
            OtlpMetricsConfig {
                interval_secs: Some(0.0),
                ..metrics_config(Protocol::Grpc, "http://127.0.0.1:4317".to_owned())
            },
            "interval_secs",
        ),
        (
            OtlpMetricsConfig {
                timeout_secs: Some(-1.0),
                ..metrics_config(Protocol::Grpc, "http://127.0.0.1:4317".to_owned())
            },
            "timeout_secs",
        ),
        (
            OtlpMetricsConfig {
                headers: [("bad header".to_owned(), "x".to_owned())].into(),
                ..metrics_config(Protocol::Grpc, "http://127.0.0.1:4317".to_owned())
            },
            "header name",
        ),
    ] {
        let error = tokentap::start(config(&sim.base_url(), metrics))
            .await
            .expect_err("refused")
            .to_string();
        assert!(
            error.starts_with("otlp_metrics:") && error.contains(field),
            "{error}"
        );
    }
    let parsed: Config = toml::from_str(
        r#"
        [otlp_metrics]
        enabled = true
        protocol = "http/protobuf"
        endpoint = "https://otel.example:4318"
        headers = { "x-api-key" = "k" }
        interval_secs = 15
        timeout_secs = 2.5
        temporality = "lowmemory"
        "#,
    )
    .unwrap();
    assert_eq!(
        parsed.otlp_metrics,
        OtlpMetricsConfig {
            enabled: true,
            protocol: Some(Protocol::HttpProtobuf),
            endpoint: Some("https://otel.example:4318".to_owned()),
            headers: [("x-api-key".to_owned(), "k".to_owned())].into(),
            interval_secs: Some(15.0),
            timeout_secs: Some(2.5),
            temporality: Some(Temporality::LowMemory),
        }
    );
    let toml = "[otlp_metrics]\nenabled = true\ntemporality = \"sometimes\"\n";
    let error = toml::from_str::<Config>(toml)
        .expect_err("refused")
        .to_string();
    assert!(error.contains("temporality"), "{error}");
    sim.shutdown().await;
}

/// With routes, each request's metrics name the replica it went to: one `server.address` and
/// `server.port` per configured upstream (a DNS name stays one server), none for a request that
/// reached no upstream.
#[tokio::test]
async fn metrics_name_the_upstream_that_served() {
    let mut collector = FakeCollectorServer::start().await.expect("fake collector");
    let mut big = exact_sim(5.0, 1.0);
    big.models = vec![MODEL.to_owned()];
    let big = sim(big).await;
    let mut small = exact_sim(5.0, 1.0);
    small.models = vec!["small".to_owned()];
    let small = sim(small).await;
    let port =
        |s: &tokentap::simulate::Simulator| s.base_url().rsplit(':').next().unwrap().to_owned();
    let (big_port, small_port) = (port(&big), port(&small));
    let mut c = Config::parse(&format!(
        "[[routes]]\nmodels = [\"{MODEL}\"]\nupstreams = [\"{}\"]\n\
         [[routes]]\nmodels = [\"small\"]\nupstreams = [\"http://localhost:{small_port}\"]\n",
        big.base_url()
    ))
    .unwrap();
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.otlp_metrics = metrics_config(Protocol::Grpc, collector.endpoint());
    let proxy = tokentap::start(c).await.unwrap();
    let url = format!("http://{}/v1/chat/completions", proxy.addr());
    let client = client();
    for (model, status) in [(MODEL, 200), (MODEL, 200), ("small", 200), ("nobody", 404)] {
        let body = chat_body(4, true, "").replace(MODEL, model);
        assert_eq!(post(&client, &url, &body).await.status, status, "{model}");
    }
    let got = collect(&mut collector, Duration::from_secs(20), |got| {
        total(&latest(got, names::REQUEST_DURATION, &[])).0 >= 4
    })
    .await;
    let on = |address: &str, port: &str| {
        total(&latest(
            &got,
            names::REQUEST_DURATION,
            &[("server.address", address), ("server.port", port)],
        ))
        .0
    };
    assert_eq!(on("127.0.0.1", &big_port), 2, "{got:#?}");
    assert_eq!(on("localhost", &small_port), 1, "{got:#?}");
    let durations = latest(&got, names::REQUEST_DURATION, &[]);
    let unserved: Vec<_> = durations
        .iter()
        .filter(|p| !p.attrs.contains_key("server.address"))
        .collect();
    assert_eq!(unserved.len(), 1, "{durations:#?}");
    assert_eq!(unserved[0].attrs["error.type"], "rejected");
    assert!(!unserved[0].attrs.contains_key("server.port"));
    // Time per output chunk, recorded as the stream goes, names the server too.
    assert_eq!(
        total(&latest(
            &got,
            names::TIME_PER_OUTPUT_CHUNK,
            &[("server.port", &small_port)]
        ))
        .0,
        3
    );
    proxy.shutdown().await;
    big.shutdown().await;
    small.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// OTLP/HTTP protobuf, to oteltap.

#[tokio::test]
async fn http_protobuf_to_oteltap() {
    let Some(mut oteltap) = Oteltap::start("http_protobuf_to_oteltap").await else {
        return;
    };
    let sim = sim(exact_sim(5.0, 1.0)).await;
    let proxy = tokentap::start(config(
        &sim.base_url(),
        metrics_config(Protocol::HttpProtobuf, oteltap.endpoint()),
    ))
    .await
    .unwrap();
    let c = client();
    let url = format!("http://{}/v1/chat/completions", proxy.addr());
    for _ in 0..3 {
        assert_eq!(post(&c, &url, &chat_body(6, true, "")).await.status, 200);
    }
    // Every metric oteltap prints, as JSON, until the duration of all three requests is in.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    // oteltap prints one metric a line, in OTLP JSON (64-bit integers as strings).
    let count = |m: &serde_json::Value| -> u64 {
        m["histogram"]["dataPoints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                p["count"]
                    .as_str()
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0)
            })
            .sum()
    };
    let done = |seen: &BTreeMap<String, serde_json::Value>| {
        seen.get(names::REQUEST_DURATION)
            .is_some_and(|m| count(m) == 3)
            && seen.get(names::TOKEN_USAGE).is_some_and(|m| count(m) == 6)
            && seen
                .get(names::TIME_PER_OUTPUT_CHUNK)
                .is_some_and(|m| count(m) == 3 * 5)
    };
    while !done(&seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(line)) = tokio::time::timeout(left, oteltap.lines.recv()).await else {
            panic!("oteltap did not get all three requests: {seen:#?}");
        };
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        find_metrics(&json, &mut seen);
    }
    let duration = &seen[names::REQUEST_DURATION];
    assert_eq!(duration["unit"], "s");
    assert_eq!(duration["histogram"]["aggregationTemporality"], 2);
    let point = &duration["histogram"]["dataPoints"][0];
    let bounds: Vec<f64> = point["explicitBounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_f64().unwrap())
        .collect();
    assert_eq!(bounds, DURATION_ADVICE);
    let attrs = point["attributes"].to_string();
    for want in [
        r#"{"key":"gen_ai.operation.name","value":{"stringValue":"chat"}}"#,
        r#"{"key":"gen_ai.provider.name","value":{"stringValue":"vllm"}}"#,
        r#"{"key":"server.address","value":{"stringValue":"127.0.0.1"}}"#,
    ] {
        assert!(attrs.contains(want), "{want} not in {attrs}");
    }
    assert_eq!(seen[names::TIME_PER_OUTPUT_CHUNK]["unit"], "s");
    let tokens = &seen[names::TOKEN_USAGE];
    assert_eq!(tokens["unit"], "{token}");
    let output: u64 = tokens["histogram"]["dataPoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["attributes"]
                .to_string()
                .contains(r#"{"stringValue":"output"}"#)
        })
        .map(|p| p["sum"].as_f64().unwrap() as u64)
        .sum();
    assert_eq!(output, 3 * 6);
    proxy.shutdown().await;
    sim.shutdown().await;
}

/// Every JSON object with a `name` of a GenAI metric, by name (the latest wins).
fn find_metrics(json: &serde_json::Value, seen: &mut BTreeMap<String, serde_json::Value>) {
    match json {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::String(name)) = map.get("name")
                && name.starts_with("gen_ai.")
            {
                seen.insert(name.clone(), json.clone());
            }
            map.values().for_each(|v| find_metrics(v, seen));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| find_metrics(v, seen)),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// The standard environment variables, with the same precedence as `[tracing]`. Environment
// variables are process-wide, so each case runs this test binary again as a child process with
// its own environment (`child_sends_one_request`).

const CHILD: &str = "TOKENTAP_OTLP_METRICS_CHILD";

/// One case: the child's environment, whether its `[otlp_metrics]` names the collector as
/// `endpoint`, and what the collector must get: `None` (nothing), or the temporality.
struct Case {
    env: Vec<(&'static str, &'static str)>,
    config_endpoint: bool,
    /// An interval from the environment alone: the export must arrive while the child still
    /// runs (before its shutdown flush).
    interval_from_env: bool,
    /// The child's start must fail with this text.
    refused: Option<&'static str>,
    temporality: Option<i32>,
}

// Two workers: the collector answers while this thread waits for a child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_configures_and_config_file_wins() {
    let dead = dead_endpoint().await;
    let case = |env, config_endpoint, temporality| Case {
        env,
        config_endpoint,
        interval_from_env: false,
        refused: None,
        temporality,
    };
    let cases = [
        // Endpoint and protocol from the environment alone.
        case(
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "{collector}"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ],
            false,
            Some(2),
        ),
        // The signal-specific variable wins over the general one.
        case(
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "{dead}"),
                ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "{collector}"),
            ],
            false,
            Some(2),
        ),
        // The file's endpoint and protocol win over the environment's.
        case(
            vec![
                ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "{dead}"),
                ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf"),
            ],
            true,
            Some(2),
        ),
        // The temporality preference, case-insensitive as the specification allows.
        case(
            vec![("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "Delta")],
            true,
            Some(1),
        ),
        case(
            vec![(
                "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
                "lowmemory",
            )],
            true,
            Some(1),
        ),
        // OTEL_SDK_DISABLED turns the metrics off.
        case(vec![("OTEL_SDK_DISABLED", "true")], true, None),
        // The export interval from OTEL_METRIC_EXPORT_INTERVAL (milliseconds).
        Case {
            interval_from_env: true,
            ..case(vec![("OTEL_METRIC_EXPORT_INTERVAL", "100")], true, Some(2))
        },
        // A preference that is none of the three is refused, naming the variable.
        Case {
            refused: Some("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE"),
            ..case(
                vec![("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "often")],
                true,
                None,
            )
        },
    ];
    for (n, case) in cases.iter().enumerate() {
        let mut collector = FakeCollectorServer::start().await.unwrap();
        let endpoint = collector.endpoint();
        let mut cmd = child_test(
            "child_sends_one_request",
            CHILD,
            &[
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
                "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
                "OTEL_METRIC_EXPORT_INTERVAL",
                "OTEL_SDK_DISABLED",
            ],
        );
        cmd.env(
            "CHILD_ENDPOINT",
            if case.config_endpoint { &endpoint } else { "" },
        )
        .env(
            "CHILD_INTERVAL",
            if case.interval_from_env { "" } else { "0.1" },
        )
        .env(
            "CHILD_LINGER_MS",
            if case.interval_from_env { "4000" } else { "0" },
        )
        .env("CHILD_REFUSED", case.refused.unwrap_or(""))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        case_env(&mut cmd, case.env.iter().copied(), &endpoint, &dead);
        let child = cmd.spawn().expect("the test binary runs");
        // With the interval from the environment, the export comes while the child lingers.
        let within = if case.interval_from_env {
            Duration::from_millis(3000)
        } else if case.temporality.is_some() {
            Duration::from_secs(10)
        } else {
            Duration::from_millis(500)
        };
        let got = collect(&mut collector, within, |got| {
            got.iter().any(|p| p.name == names::REQUEST_DURATION)
        })
        .await;
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "case {n} child failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The child flushed on shutdown: whatever it exported is in by now.
        let mut got = got;
        got.extend(collect(&mut collector, Duration::from_millis(200), |_| false).await);
        let durations: Vec<&Point> = got
            .iter()
            .filter(|p| p.name == names::REQUEST_DURATION)
            .collect();
        match case.temporality {
            None => assert!(durations.is_empty(), "case {n}: {durations:#?}"),
            Some(t) => {
                assert!(!durations.is_empty(), "case {n}: nothing exported");
                assert!(durations.iter().all(|p| p.temporality == t), "case {n}");
                assert_eq!(durations[0].attrs["gen_ai.operation.name"], "chat");
            }
        }
        collector.abort();
    }
}

/// Not a test of its own: the child process of `environment_configures_and_config_file_wins`.
#[tokio::test]
#[ignore = "run as a child process by environment_configures_and_config_file_wins"]
async fn child_sends_one_request() {
    if std::env::var(CHILD).as_deref() != Ok("1") {
        return;
    }
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let sim = sim(exact_sim(5.0, 5.0)).await;
    let mut config = proxy_config(&sim.base_url());
    config.telemetry.discover_models = false;
    config.otlp_metrics = OtlpMetricsConfig {
        enabled: true,
        endpoint: var("CHILD_ENDPOINT"),
        protocol: var("CHILD_ENDPOINT").map(|_| Protocol::Grpc),
        interval_secs: var("CHILD_INTERVAL").map(|s| s.parse().unwrap()),
        timeout_secs: Some(3.0),
        ..OtlpMetricsConfig::default()
    };
    if let Some(refused) = var("CHILD_REFUSED") {
        let error = tokentap::start(config)
            .await
            .expect_err("refused")
            .to_string();
        assert!(error.contains(&refused), "{error}");
        sim.shutdown().await;
        return;
    }
    let proxy = tokentap::start(config).await.unwrap();
    let r = post(
        &client(),
        &format!("http://{}/v1/chat/completions", proxy.addr()),
        &chat_body(3, true, ""),
    )
    .await;
    assert_eq!(r.status, 200);
    let linger: u64 = var("CHILD_LINGER_MS").map_or(0, |s| s.parse().unwrap());
    tokio::time::sleep(Duration::from_millis(linger)).await;
    proxy.shutdown().await;
    sim.shutdown().await;
}
