//! Tenants (docs/METRICS.md §7): the `tenant` label through the proxy, bounded whatever the
//! clients send, and `/stats?tenant=`.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use tokentap::config::Config;

/// The families that carry `tenant`, and only they.
const TENANT_FAMILIES: &[&str] = &[
    "tokentap_requests_total",
    "tokentap_goodput_requests_total",
    "tokentap_time_to_first_token_seconds",
    "tokentap_time_per_output_token_seconds",
    "tokentap_e2e_request_latency_seconds",
];

fn tenant_config(upstream: &str, allowed: &[&str], max: usize) -> Config {
    let mut c = proxy_config(upstream);
    c.telemetry.tenant_header = Some("x-tenant".to_owned());
    c.telemetry.tenants = allowed.iter().map(|s| (*s).to_owned()).collect();
    c.telemetry.max_tenants = max;
    c
}

/// The family of a sample name (`_bucket`, `_sum` and `_count` belong to their histogram).
fn family(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .filter(|base| TENANT_FAMILIES.contains(base))
        .unwrap_or(name)
}

/// Every series of the exposition, as `name{labels}`.
fn series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.rsplit_once(' ').unwrap().0.to_owned())
        .collect()
}

/// The `tenant` label values in the exposition.
fn tenants(text: &str) -> BTreeSet<String> {
    samples(text)
        .into_iter()
        .flat_map(|s| s.labels)
        .filter(|(k, _)| k == "tenant")
        .map(|(_, v)| v)
        .collect()
}

async fn chat(c: &TestClient, proxy: std::net::SocketAddr, headers: &[(&str, &str)]) {
    let r = send(
        c,
        http::Method::POST,
        &format!("http://{proxy}/v1/chat/completions"),
        &chat_body(3, true, ""),
        headers,
    )
    .await;
    assert_eq!(r.status, 200);
}

async fn get_json(c: &TestClient, url: &str) -> (http::StatusCode, serde_json::Value) {
    let r = send(c, http::Method::GET, url, "", &[]).await;
    let v = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
    (r.status, v)
}

#[tokio::test]
async fn without_a_tenant_header_no_tenant_label_exists() {
    let sim = sim(exact_sim(2.0, 1.0)).await;
    let proxy = tokentap::start(proxy_config(&sim.base_url()))
        .await
        .unwrap();
    let admin = proxy.admin_addr().unwrap();
    let c = client();
    chat(&c, proxy.addr(), &[("x-tenant", "a")]).await;
    chat(&c, proxy.addr(), &[]).await;
    let text = scrape(admin).await;
    assert_eq!(requests_total(&text, "ok", "200"), 2.0);
    assert!(!text.contains("tenant"), "{text}");
    let (status, _) = get_json(&c, &format!("http://{admin}/stats?tenant=a")).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn allow_list_first_come_other_and_none_through_the_proxy() {
    let log = access_log();
    let sim = sim(exact_sim(2.0, 1.0)).await;
    let mut config = tenant_config(&sim.base_url(), &["vip"], 3);
    config.telemetry.access_log = true;
    let proxy = tokentap::start(config).await.unwrap();
    let admin = proxy.admin_addr().unwrap();
    let c = client();
    // (header value, request id, label it must get)
    let requests: &[(Option<&str>, &str, &str)] = &[
        (Some("team-a"), "tn-1", "team-a"),
        (Some("team-b"), "tn-2", "team-b"),
        // Both first-come slots are taken: a third name is other, and never logged as itself.
        (Some("sk-secret-42"), "tn-3", "other"),
        // The allow-list keeps its label however many came first.
        (Some("vip"), "tn-4", "vip"),
        (None, "tn-5", "none"),
        (Some(" team-a "), "tn-6", "team-a"),
        (Some(""), "tn-7", "none"),
        (Some(&"x".repeat(65)), "tn-8", "other"),
    ];
    for (tenant, id, _) in requests {
        let mut headers = vec![("x-request-id", *id)];
        if let Some(tenant) = tenant {
            headers.push(("x-tenant", tenant));
        }
        chat(&c, proxy.addr(), &headers).await;
    }
    let text = scrape(admin).await;
    let want = BTreeMap::from([
        ("team-a", 2.0),
        ("team-b", 1.0),
        ("vip", 1.0),
        ("other", 2.0),
        ("none", 2.0),
    ]);
    assert_eq!(
        tenants(&text),
        want.keys().map(|s| (*s).to_owned()).collect(),
        "{text}"
    );
    for (tenant, n) in &want {
        let t = [("tenant", *tenant)];
        let ok = [("outcome", "ok"), ("status", "200"), ("tenant", *tenant)];
        assert_eq!(value(&text, "tokentap_requests_total", &ok), *n, "{tenant}");
        assert_eq!(
            value(&text, "tokentap_goodput_requests_total", &t),
            *n,
            "{tenant}"
        );
        for h in [
            "tokentap_time_to_first_token_seconds_count",
            "tokentap_time_per_output_token_seconds_count",
            "tokentap_e2e_request_latency_seconds_count",
        ] {
            assert_eq!(value(&text, h, &t), *n, "{h} {tenant}");
        }
    }
    // Exactly the families of §7 carry the label, and every series of theirs does.
    for s in samples(&text) {
        let has = s.labels.iter().any(|(k, _)| k == "tenant");
        let should = TENANT_FAMILIES.contains(&family(&s.name));
        assert_eq!(has, should, "{} {:?}", s.name, s.labels);
    }
    assert!(!text.contains("sk-secret"), "{text}");
    // ITL has no tenant: all eight requests in one series.
    assert_eq!(
        value(&text, "tokentap_inter_token_latency_seconds_count", &[]),
        16.0
    );

    // The access log names the label, never a header value that did not become one.
    let lines: Vec<_> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.get("request_id").is_some_and(|id| id.starts_with("tn-")))
        .cloned()
        .collect();
    assert_eq!(lines.len(), requests.len());
    for (_, id, label) in requests {
        let line = lines.iter().find(|l| l["request_id"] == *id).unwrap();
        assert_eq!(line["tenant"], *label, "{id}");
    }
    assert!(
        lines
            .iter()
            .all(|l| l.values().all(|v| !v.contains("sk-secret"))),
        "{lines:?}"
    );

    // /stats?tenant=: one summary per tenant across models.
    let (status, v) = get_json(&c, &format!("http://{admin}/stats?tenant=team-a")).await;
    assert_eq!(status, 200);
    let t = v["tenants"].as_object().unwrap();
    assert_eq!(t.len(), 1, "{v}");
    assert_eq!(t["team-a"]["completed"], 2);
    assert_eq!(t["team-a"]["total_output_tokens"], 6);
    assert_eq!(t["team-a"]["itl_ms"]["count"], 4);
    // A name without its own label is shown under the one it is counted in; asking takes no slot.
    let (_, v) = get_json(&c, &format!("http://{admin}/stats?tenant=someone-new")).await;
    assert_eq!(v["tenants"]["other"]["completed"], 2, "{v}");
    let (_, v) = get_json(&c, &format!("http://{admin}/stats?tenant=*")).await;
    let all: BTreeMap<String, u64> = v["tenants"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| (k.clone(), s["completed"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        all,
        want.iter()
            .map(|(k, n)| ((*k).to_owned(), *n as u64))
            .collect()
    );
    let (_, v) = get_json(&c, &format!("http://{admin}/stats?tenant=%20")).await;
    assert_eq!(v["tenants"].as_object().unwrap().len(), 1, "{v}");
    assert!(v["tenants"]["other"].is_object(), "{v}");

    let admin_url = format!("http://{admin}");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tokentap"))
            .args(["stats", "--admin", &admin_url, "--tenant", "team-b"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("tokentap: tenant team-b, last 300s"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Successful requests:                     1"),
        "{stdout}"
    );
    assert!(!stdout.contains("team-a"), "{stdout}");
}

/// Ten thousand distinct header values: past the first `max_tenants`, nothing new is made, not
/// a series and not a `/stats` window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tenants_stay_bounded() {
    const TOTAL: usize = 10_000;
    const MAX: usize = 64;
    const CONCURRENCY: usize = 32;
    let sim = sim(exact_sim(0.0, 0.0)).await;
    let proxy = tokentap::start(tenant_config(&sim.base_url(), &[], MAX))
        .await
        .unwrap();
    let admin = proxy.admin_addr().unwrap();
    let addr = proxy.addr();
    let c = client();
    let run = |range: std::ops::Range<usize>| {
        let c = c.clone();
        async move {
            let mut tasks = tokio::task::JoinSet::new();
            for worker in 0..CONCURRENCY {
                let c = c.clone();
                let range = range.clone();
                tasks.spawn(async move {
                    for i in range.skip(worker).step_by(CONCURRENCY) {
                        let tenant = format!("tenant-{i:05}");
                        chat(&c, addr, &[("x-tenant", &tenant)]).await;
                    }
                });
            }
            while let Some(done) = tasks.join_next().await {
                done.unwrap();
            }
        }
    };
    // The slots fill first (in order, so which names got them is known), then one more is other.
    for i in 0..=MAX {
        chat(&c, addr, &[("x-tenant", &format!("tenant-{i:05}"))]).await;
    }
    let early = scrape(admin).await;
    run(MAX + 1..TOTAL).await;
    let late = scrape(admin).await;

    let labels = tenants(&late);
    assert_eq!(labels.len(), MAX + 1, "{labels:?}");
    assert!(labels.contains("other"));
    assert!(labels.contains("tenant-00000") && labels.contains(&format!("tenant-{:05}", MAX - 1)));
    assert_eq!(
        series(&early),
        series(&late),
        "series grew after the slots filled"
    );
    assert_eq!(requests_total(&late, "ok", "200"), TOTAL as f64);
    assert_eq!(
        value(
            &late,
            "tokentap_requests_total",
            &[("outcome", "ok"), ("tenant", "other")]
        ),
        (TOTAL - MAX) as f64
    );
    // Per tenant label: 11 request counters made at 0 up front, goodput, and three histograms.
    let per_tenant = late
        .lines()
        .filter(|l| l.contains("tenant=\"tenant-00000\""))
        .count();
    let with_tenant = late.lines().filter(|l| l.contains("tenant=\"")).count();
    assert_eq!(with_tenant, per_tenant * (MAX + 1));

    // The /stats windows are capped the same way: one per label.
    let (_, v) = get_json(&c, &format!("http://{admin}/stats?tenant=*")).await;
    let windows = v["tenants"].as_object().unwrap();
    assert_eq!(windows.len(), MAX + 1);
    assert_eq!(windows["other"]["completed"], (TOTAL - MAX) as u64);
    let total: u64 = windows
        .values()
        .map(|s| s["completed"].as_u64().unwrap())
        .sum();
    assert_eq!(total, TOTAL as u64);
}

/// The span carries the label value, never a header value that did not become one.
#[tokio::test]
async fn the_span_carries_the_label() {
    use fake_opentelemetry_collector::FakeCollectorServer;
    use tokentap::config::{Protocol, TracingConfig};

    let mut collector = FakeCollectorServer::start().await.expect("fake collector");
    let sim = sim(exact_sim(2.0, 1.0)).await;
    let mut config = tenant_config(&sim.base_url(), &[], 1);
    config.telemetry.discover_models = false;
    config.tracing = TracingConfig {
        enabled: true,
        protocol: Some(Protocol::Grpc),
        endpoint: Some(collector.endpoint()),
        scheduled_delay_ms: Some(20),
        timeout_secs: Some(5.0),
        ..TracingConfig::default()
    };
    let proxy = tokentap::start(config).await.unwrap();
    let c = client();
    // (trace id, tenant header, label)
    let cases = [
        ("0af7651916cd43dd8448eb211c800001", Some("team-a"), "team-a"),
        (
            "0af7651916cd43dd8448eb211c800002",
            Some("sk-secret-9"),
            "other",
        ),
        ("0af7651916cd43dd8448eb211c800003", None, "none"),
    ];
    for (trace, tenant, _) in cases {
        let parent = format!("00-{trace}-b7ad6b7169203331-01");
        let mut headers = vec![("traceparent", parent.as_str())];
        if let Some(tenant) = tenant {
            headers.push(("x-tenant", tenant));
        }
        chat(&c, proxy.addr(), &headers).await;
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut spans = Vec::new();
    while spans.len() < cases.len() && tokio::time::Instant::now() < deadline {
        spans.extend(collector.exported_spans(0, std::time::Duration::ZERO).await);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(spans.len(), cases.len(), "{spans:#?}");
    for (trace, _, label) in cases {
        let span = spans.iter().find(|s| s.trace_id == trace).unwrap();
        let value = &span.attributes["tokentap.tenant"];
        assert!(
            value.contains(&format!("StringValue(\"{label}\")")),
            "{value}"
        );
        assert!(
            span.attributes.values().all(|v| !v.contains("sk-secret")),
            "{span:#?}"
        );
    }
    proxy.shutdown().await;
    collector.abort();
}
