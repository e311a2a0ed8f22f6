//! The standard `OTEL_*` environment variables configure the exporter, and values written in
//! `[tracing]` win over them. Environment variables are process-wide, so each case runs this
//! test binary again as a child process with its own environment (`child_sends_one_request`),
//! exporting to a `fake-opentelemetry-collector` that the parent runs.

mod common;

use std::time::Duration;

use common::otlp::{case_env, child_test, dead_endpoint};
use common::*;
use fake_opentelemetry_collector::FakeCollectorServer;
use http::Method;
use tokentap::config::TracingConfig;

const CHILD: &str = "TOKENTAP_OTEL_CHILD";
const PARENT_SPAN: &str = "b7ad6b7169203331";

/// One case: the child's environment, whether its `[tracing]` names the collector as
/// `endpoint`, its `sample_ratio`, and whether the collector must get the span.
struct Case {
    env: Vec<(&'static str, String)>,
    config_endpoint: bool,
    sample_ratio: Option<f64>,
    exported: bool,
}

fn run_child(n: u32, case: &Case, collector: &str, dead: &str) {
    let trace = format!("{:032x}", 0xe0_u128 + u128::from(n));
    let mut cmd = child_test(
        "child_sends_one_request",
        CHILD,
        &[
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_TRACES_SAMPLER",
            "OTEL_TRACES_SAMPLER_ARG",
            "OTEL_SDK_DISABLED",
            "OTEL_SERVICE_NAME",
        ],
    );
    cmd.env("CHILD_TRACE", &trace)
        .env(
            "CHILD_ENDPOINT",
            if case.config_endpoint { collector } else { "" },
        )
        .env(
            "CHILD_RATIO",
            case.sample_ratio.map(|r| r.to_string()).unwrap_or_default(),
        );
    case_env(
        &mut cmd,
        case.env.iter().map(|(k, v)| (*k, v.as_str())),
        collector,
        dead,
    );
    let out = cmd.output().expect("the test binary runs");
    assert!(
        out.status.success(),
        "case {n} child failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// Two workers: the collector answers while this thread waits for a child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_configures_and_config_file_wins() {
    let mut collector = FakeCollectorServer::start().await.unwrap();
    let endpoint = collector.endpoint();
    let dead = dead_endpoint().await;
    let cases = [
        // Endpoint and protocol from the environment alone.
        Case {
            env: vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "{collector}".to_owned()),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_owned()),
                ("OTEL_SERVICE_NAME", "from-env".to_owned()),
            ],
            config_endpoint: false,
            sample_ratio: None,
            exported: true,
        },
        // The signal-specific variable wins over the general one.
        Case {
            env: vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "{dead}".to_owned()),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "{collector}".to_owned(),
                ),
            ],
            config_endpoint: false,
            sample_ratio: None,
            exported: true,
        },
        // The file's endpoint and protocol win over the environment's.
        Case {
            env: vec![
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "{dead}".to_owned()),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()),
            ],
            config_endpoint: true,
            sample_ratio: None,
            exported: true,
        },
        // The environment's sampler applies when the file sets no ratio...
        Case {
            env: vec![("OTEL_TRACES_SAMPLER", "always_off".to_owned())],
            config_endpoint: true,
            sample_ratio: None,
            exported: false,
        },
        // ...and the file's ratio wins over it.
        Case {
            env: vec![("OTEL_TRACES_SAMPLER", "always_off".to_owned())],
            config_endpoint: true,
            sample_ratio: Some(1.0),
            exported: true,
        },
        // OTEL_SDK_DISABLED turns tracing off.
        Case {
            env: vec![("OTEL_SDK_DISABLED", "true".to_owned())],
            config_endpoint: true,
            sample_ratio: None,
            exported: false,
        },
    ];
    for (n, case) in cases.iter().enumerate() {
        let n = n as u32;
        run_child(n, case, &endpoint, &dead);
        let trace = format!("{:032x}", 0xe0_u128 + u128::from(n));
        let spans = collector
            .exported_spans(
                1,
                Duration::from_millis(if case.exported { 10_000 } else { 300 }),
            )
            .await;
        let mine: Vec<_> = spans.iter().filter(|s| s.trace_id == trace).collect();
        assert_eq!(
            mine.len(),
            usize::from(case.exported),
            "case {n}: {spans:#?}"
        );
        if let Some(span) = mine.first() {
            assert_eq!(span.parent_span_id, PARENT_SPAN);
            assert_eq!(span.name, format!("chat {MODEL}"));
        }
    }
    collector.abort();
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
    config.tracing = TracingConfig {
        enabled: true,
        endpoint: var("CHILD_ENDPOINT"),
        protocol: var("CHILD_ENDPOINT").map(|_| tokentap::config::Protocol::Grpc),
        sample_ratio: var("CHILD_RATIO").map(|r| r.parse().unwrap()),
        scheduled_delay_ms: Some(10),
        timeout_secs: Some(3.0),
        ..TracingConfig::default()
    };
    let proxy = tokentap::start(config).await.unwrap();
    let tp = format!("00-{}-{PARENT_SPAN}-01", var("CHILD_TRACE").unwrap());
    let r = send(
        &client(),
        Method::POST,
        &format!("http://{}/v1/chat/completions", proxy.addr()),
        &chat_body(3, true, ""),
        &[("traceparent", &tp)],
    )
    .await;
    assert_eq!(r.status, 200);
    proxy.shutdown().await;
    sim.shutdown().await;
}
