//! Routes and balancing end to end: several simulators and the proxy in-process on
//! `127.0.0.1:0`: routing by model, each policy's distribution with a slow replica, one retry
//! before the first byte (and none after), ejection and recovery, readiness, and bad routes
//! refused at load.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use http::Method;
use tokentap::Running;
use tokentap::config::Config;
use tokentap::simulate::Simulator;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// A proxy on free loopback ports with the `[[routes]]` of `routes` (TOML).
async fn routed(routes: &str) -> Running {
    let mut c = Config::parse(routes).expect("the routes parse");
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    c.telemetry.access_log = false;
    c.proxy.shutdown_grace_secs = 1.0;
    tokentap::start(c).await.expect("the proxy starts")
}

fn route(models: &[&str], upstreams: &[String], balance: &str) -> String {
    format!("[[routes]]\nmodels = {models:?}\nupstreams = {upstreams:?}\nbalance = \"{balance}\"\n")
}

/// A simulator serving `models`, with exact timings and answers of exactly `tokens` tokens.
async fn replica(models: &[&str], itl_ms: f64, max_num_seqs: u32, tokens: u32) -> Simulator {
    let mut c = exact_sim(5.0, itl_ms);
    c.models = models.iter().map(|m| m.to_string()).collect();
    c.timing.max_num_seqs = max_num_seqs;
    c.output.min_tokens = tokens;
    c.output.max_tokens = tokens;
    sim(c).await
}

/// The URL of a loopback port nothing listens on (bound, then let go).
async fn closed_port() -> (String, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    (format!("http://{addr}"), addr)
}

fn chat(model: &str, stream: bool) -> String {
    format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":8,"stream":{stream}}}"#
    )
}

/// Waits until the proxy's first poll of the upstreams found `down` refusing and ejected it,
/// and until that first ejection (1 s) is over, so that requests meet `down` live.
async fn settle(proxy: &Running, down: &str) {
    for _ in 0..500 {
        let text = metrics(proxy).await;
        if value(
            &text,
            "tokentap_upstream_ejections_total",
            &[("upstream", down)],
        ) == 1.0
        {
            tokio::time::sleep(Duration::from_millis(1050)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the poll never ejected {down}");
}

fn requests(sim: &Simulator) -> u64 {
    sim.stats().requests
}

async fn metrics(proxy: &Running) -> String {
    scrape(proxy.admin_addr().unwrap()).await
}

#[tokio::test]
async fn requests_go_to_the_route_of_their_model() {
    let a = replica(&["model-a"], 1.0, 256, 4).await;
    let b = replica(&["model-b", MODEL], 1.0, 256, 4).await;
    let proxy = routed(
        &(route(&["model-a"], &[a.base_url()], "round_robin")
            + &route(&["*"], &[b.base_url()], "least_request")),
    )
    .await;
    let (client, base) = (client(), format!("http://{}", proxy.addr()));
    let chat_url = format!("{base}/v1/chat/completions");
    for _ in 0..3 {
        assert_eq!(
            post(&client, &chat_url, &chat("model-a", true))
                .await
                .status,
            200
        );
    }
    assert_eq!((requests(&a), requests(&b)), (3, 0));
    // Completions and embeddings are routed by model too.
    let completion = r#"{"model":"model-a","prompt":"once","max_tokens":4}"#;
    let r = post(&client, &format!("{base}/v1/completions"), completion).await;
    assert_eq!(r.status, 200);
    let embedding = r#"{"model":"model-a","input":"hello"}"#;
    let r = post(&client, &format!("{base}/v1/embeddings"), embedding).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!((requests(&a), requests(&b)), (5, 0));
    // A model no route names, a body without a model and one that is not JSON: the "*" route.
    assert_eq!(
        post(&client, &chat_url, &chat("model-b", false))
            .await
            .status,
        200
    );
    let no_model = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#;
    assert_eq!(post(&client, &chat_url, no_model).await.status, 200);
    assert_eq!(post(&client, &chat_url, "{not json").await.status, 400);
    assert_eq!((requests(&a), requests(&b)), (5, 3));
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_model_no_route_serves_gets_vllms_404_and_outcome_rejected() {
    let a = replica(&["model-a"], 1.0, 256, 4).await;
    let b = replica(&["model-b"], 1.0, 256, 4).await;
    let proxy = routed(
        &(route(&["model-a"], &[a.base_url()], "round_robin")
            + &route(&["model-b"], &[b.base_url()], "round_robin")),
    )
    .await;
    let url = format!("http://{}/v1/chat/completions", proxy.addr());
    let r = post(&client(), &url, &chat("model-z", true)).await;
    assert_eq!(r.status, 404);
    // Exactly what vLLM (and the simulator standing in for it) answers.
    let direct = post(
        &client(),
        &format!("{}/v1/chat/completions", a.base_url()),
        &chat("model-z", true),
    )
    .await;
    assert_eq!(direct.status, 404);
    let ours: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let theirs: serde_json::Value = serde_json::from_slice(&direct.body).unwrap();
    assert_eq!(ours, theirs);
    assert_eq!(
        ours["error"]["message"],
        "The model `model-z` does not exist."
    );
    assert_eq!(
        (requests(&a), requests(&b)),
        (1, 0),
        "only the direct request"
    );
    let text = metrics(&proxy).await;
    assert_eq!(requests_total(&text, "rejected", "404"), 1.0);
    // Without a usable model: the first route, as there is no "*".
    let no_model = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#;
    assert_eq!(post(&client(), &url, no_model).await.status, 200);
    assert_eq!((requests(&a), requests(&b)), (2, 0));
    proxy.shutdown().await;
}

#[tokio::test]
async fn models_lists_the_union_of_what_the_routes_reach() {
    let a = replica(&["model-a", "shared"], 1.0, 256, 4).await;
    let b = replica(&["model-b", "shared"], 1.0, 256, 4).await;
    let (down, _) = closed_port().await;
    let proxy = routed(
        &(route(&["model-a"], &[a.base_url()], "round_robin")
            + &route(&["*"], &[b.base_url(), down], "round_robin")),
    )
    .await;
    let r = send(
        &client(),
        Method::GET,
        &format!("http://{}/v1/models", proxy.addr()),
        "",
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    let list: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    // "shared" once, from the replica its route reaches; the replica that is down adds nothing.
    assert_eq!(ids, ["model-a", "model-b", "shared"]);
    assert_eq!(
        list["data"][0]["owned_by"], "vllm",
        "entries are the replicas' own"
    );
    proxy.shutdown().await;
}

/// Sends `n` streaming chats through `proxy` from `concurrency` clients at once; all must
/// succeed.
async fn load(proxy: &Running, n: usize, concurrency: usize) {
    let url = format!("http://{}/v1/chat/completions", proxy.addr());
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (url, next) = (url.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let client = client();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                let r = post(&client, &url, &chat(MODEL, true)).await;
                assert_eq!(r.status, 200);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Requests each of two fast replicas and one slow one (4× the ITL, 2 sequences at a time)
/// got under `balance`.
async fn distribution(balance: &str) -> [u64; 3] {
    let fast1 = replica(&[MODEL], 5.0, 256, 20).await;
    let fast2 = replica(&[MODEL], 5.0, 256, 20).await;
    let slow = replica(&[MODEL], 20.0, 2, 20).await;
    let upstreams = [fast1.base_url(), fast2.base_url(), slow.base_url()];
    let proxy = routed(&route(&["*"], &upstreams, balance)).await;
    load(&proxy, 90, 9).await;
    proxy.shutdown().await;
    let counts = [requests(&fast1), requests(&fast2), requests(&slow)];
    assert_eq!(counts.iter().sum::<u64>(), 90, "{balance}: {counts:?}");
    counts
}

#[tokio::test]
async fn round_robin_gives_each_replica_its_turn() {
    assert_eq!(distribution("round_robin").await, [30, 30, 30]);
}

#[tokio::test]
async fn least_request_gives_the_slow_replica_clearly_less() {
    let [a, b, slow] = distribution("least_request").await;
    assert!(slow * 2 < a.min(b), "fast {a}, {b}; slow {slow}");
}

#[tokio::test]
async fn peak_ewma_gives_the_slow_replica_clearly_less() {
    let [a, b, slow] = distribution("peak_ewma").await;
    assert!(slow * 2 < a.min(b), "fast {a}, {b}; slow {slow}");
}

#[tokio::test]
async fn a_refused_connection_is_retried_once_on_another_replica() {
    let (down, _) = closed_port().await;
    let up = replica(&[MODEL], 1.0, 256, 4).await;
    let proxy = routed(&route(
        &["*"],
        &[down.clone(), up.base_url()],
        "round_robin",
    ))
    .await;
    settle(&proxy, &down).await;
    let url = format!("http://{}/v1/chat/completions", proxy.addr());
    for _ in 0..6 {
        let r = post(&client(), &url, &chat(MODEL, true)).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    assert_eq!(requests(&up), 6);
    let text = metrics(&proxy).await;
    let at = |name: &str, upstream: &str| value(&text, name, &[("upstream", upstream)]);
    assert_eq!(at("tokentap_upstream_retries_total", &down), 1.0, "{text}");
    let connect_errors = at("tokentap_upstream_connect_errors_total", &down);
    assert_eq!(connect_errors, 2.0, "the poll's and one request's");
    assert_eq!(at("tokentap_upstream_ejections_total", &down), 2.0);
    assert_eq!(at("tokentap_upstream_ejected", &down), 1.0);
    let sent = at("tokentap_upstream_requests_total", &up.base_url());
    assert_eq!(sent, 7.0, "six requests and the /v1/models poll");
    assert_eq!(requests_total(&text, "ok", "200"), 6.0);
    let live = value(&text, "tokentap_route_live_upstreams", &[("route", "*")]);
    assert_eq!(live, 1.0);
    // Every `upstream` label value is a configured address.
    for s in samples(&text) {
        if let Some((_, v)) = s.labels.iter().find(|(k, _)| k == "upstream") {
            assert!(*v == down || *v == up.base_url(), "label {v}");
        }
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_streamed_body_is_not_sent_twice() {
    let (down, _) = closed_port().await;
    let up = replica(&[MODEL], 1.0, 256, 4).await;
    // One "*" route: bodies are not read for routing, and embeddings are not inspected, so
    // this body streams on to the upstream and cannot be sent again.
    let proxy = routed(&route(
        &["*"],
        &[down.clone(), up.base_url()],
        "round_robin",
    ))
    .await;
    settle(&proxy, &down).await;
    let url = format!("http://{}/v1/embeddings", proxy.addr());
    let body = format!(r#"{{"model":"{MODEL}","input":"hello"}}"#);
    let r = post(&client(), &url, &body).await;
    assert_eq!(r.status, 502);
    assert_eq!(requests(&up), 0);
    // The refusing replica is ejected now: the next goes to the live one.
    assert_eq!(post(&client(), &url, &body).await.status, 200);
    assert_eq!(requests(&up), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn no_retry_after_bytes_went_out() {
    // An upstream that reads the request, then closes without answering.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hangup = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = socket.read(&mut buf).await;
        }
    });
    let up = replica(&[MODEL], 1.0, 256, 4).await;
    let proxy = routed(&route(&["*"], &[hangup, up.base_url()], "round_robin")).await;
    let url = format!("http://{}/v1/chat/completions", proxy.addr());
    let r = post(&client(), &url, &chat(MODEL, true)).await;
    assert_eq!(r.status, 502);
    assert_eq!(requests(&up), 0, "the request was not sent a second time");
    let text = metrics(&proxy).await;
    assert_eq!(requests_total(&text, "upstream_disconnect", "502"), 1.0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn all_replicas_down_is_a_502_that_names_no_address() {
    let (a, _) = closed_port().await;
    let (b, _) = closed_port().await;
    let proxy = routed(&route(&["*"], &[a, b], "least_request")).await;
    let url = format!("http://{}/v1/chat/completions", proxy.addr());
    let r = post(&client(), &url, &chat(MODEL, true)).await;
    assert_eq!(r.status, 502);
    let body = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(!body.contains("127.0.0.1"), "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["type"], "upstream_connect_error");
    let text = metrics(&proxy).await;
    assert_eq!(requests_total(&text, "connect_error", "502"), 1.0);
    // Both were tried (the retry went to the other), and both are ejected: not ready.
    assert_eq!(value(&text, "tokentap_upstream_ejections_total", &[]), 2.0);
    let ready = send(
        &client(),
        Method::GET,
        &format!("http://{}/readyz", proxy.admin_addr().unwrap()),
        "",
        &[],
    )
    .await;
    assert_eq!(ready.status, 503);
    proxy.shutdown().await;
}

async fn readyz(proxy: &Running) -> u16 {
    let url = format!("http://{}/readyz", proxy.admin_addr().unwrap());
    send(&client(), Method::GET, &url, "", &[])
        .await
        .status
        .as_u16()
}

#[tokio::test]
async fn an_ejected_replica_is_tried_again_after_its_backoff_and_recovers() {
    let (down, down_addr) = closed_port().await;
    let a = replica(&["model-a"], 1.0, 256, 4).await;
    let b = replica(&["model-b"], 1.0, 256, 4).await;
    let proxy = routed(
        &(route(&["model-a"], &[a.base_url()], "round_robin")
            + &route(&["model-b"], &[down.clone(), b.base_url()], "round_robin")),
    )
    .await;
    settle(&proxy, &down).await;
    let url = format!("http://{}/v1/chat/completions", proxy.addr());
    let chat_b = || async { post(&client(), &url, &chat("model-b", true)).await.status };
    // Its turn: refused, retried on the other, and ejected for the second backoff (2 s).
    assert_eq!(chat_b().await, 200);
    let ejected = |text: &str| value(text, "tokentap_upstream_ejected", &[("upstream", &down)]);
    let text = metrics(&proxy).await;
    assert_eq!(ejected(&text), 1.0);
    let live = |text: &str| {
        value(
            text,
            "tokentap_route_live_upstreams",
            &[("route", "model-b")],
        )
    };
    assert_eq!(live(&text), 1.0);
    // The replica comes back on the same port, but is not balanced onto until its backoff ends.
    let mut config = exact_sim(5.0, 1.0);
    config.models = vec!["model-b".to_owned()];
    let back = Simulator::start(config, down_addr).await.unwrap();
    for _ in 0..4 {
        assert_eq!(chat_b().await, 200);
    }
    assert_eq!(requests(&back), 0);
    assert_eq!(requests(&b), 5);
    tokio::time::sleep(Duration::from_millis(2050)).await;
    for _ in 0..2 {
        assert_eq!(chat_b().await, 200);
    }
    assert_eq!(requests(&back), 1, "tried again, and answered");
    let text = metrics(&proxy).await;
    assert_eq!(ejected(&text), 0.0);
    assert_eq!(live(&text), 2.0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn one_routes_outage_leaves_the_proxy_ready() {
    let (down, _) = closed_port().await;
    let a = replica(&["model-a"], 1.0, 256, 4).await;
    let proxy = routed(
        &(route(&["model-a"], &[a.base_url()], "round_robin")
            + &route(&["model-b"], &[down], "round_robin")),
    )
    .await;
    let url = format!("http://{}/v1/chat/completions", proxy.addr());
    assert_eq!(
        post(&client(), &url, &chat("model-b", true)).await.status,
        502
    );
    let mut status = 0;
    for _ in 0..200 {
        status = readyz(&proxy).await;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, 200, "model-a's route is live");
    let text = metrics(&proxy).await;
    assert_eq!(
        value(
            &text,
            "tokentap_route_live_upstreams",
            &[("route", "model-b")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &text,
            "tokentap_route_live_upstreams",
            &[("route", "model-a")]
        ),
        1.0
    );
    proxy.shutdown().await;
}

/// `tokentap` itself on a config file: its exit code and what it printed to stderr.
fn tokentap(args: &[&str], config: &str) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!("tokentap-routes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{}.toml", config.len()));
    std::fs::write(&file, config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokentap"))
        .args(args)
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_routes_are_refused_at_load_with_the_field_named() {
    let ok = route(
        &["a"],
        &["http://10.0.0.1:8000".to_owned()],
        "least_request",
    );
    let cases = [
        (
            ok.clone() + &route(&["a"], &["http://10.0.0.2:8000".to_owned()], "round_robin"),
            "routes[1].models",
        ),
        (
            route(&["*"], &["http://h:1".to_owned()], "round_robin")
                + &route(&["*"], &["http://h:2".to_owned()], "round_robin"),
            "routes[1].models",
        ),
        (route(&["a"], &[], "round_robin"), "routes[0].upstreams"),
        (
            route(&["a"], &["http://h:1".to_owned()], "fastest"),
            "balance",
        ),
        (
            route(&["a"], &["http://h:1/v1".to_owned()], "round_robin"),
            "routes[0].upstreams",
        ),
        (
            "[upstream]\nurl = \"http://h:2\"\n".to_owned() + &ok,
            "upstream.url",
        ),
        (
            ok.clone() + "idle_timeout_secs = 0\n",
            "routes[0].idle_timeout_secs",
        ),
        (ok.clone() + "pool_max_idle = -1\n", "pool_max_idle"),
    ];
    for (config, field) in cases {
        let (code, stderr) = tokentap(&["check-config"], &config);
        assert_eq!(code, 2, "{config}");
        assert!(stderr.contains(field), "{config}: {stderr}");
    }
    assert_eq!(tokentap(&["check-config"], &ok).0, 0);
    // `--upstream` beside a file with routes, also when it names the default URL.
    for url in ["http://h:3", "http://127.0.0.1:8000"] {
        let (code, stderr) = tokentap(&["serve", "--upstream", url, "--config"], &ok);
        assert_eq!(code, 2, "{url}");
        assert!(stderr.contains("upstream.url"), "{url}: {stderr}");
    }
}

#[tokio::test]
async fn a_routes_own_timeout_applies_to_its_requests_only() {
    // Non-streaming answers come whole after 6 tokens × 100 ms.
    let a = replica(&["model-a", "model-b"], 100.0, 256, 6).await;
    let proxy = routed(
        &(route(&["model-a"], &[a.base_url()], "round_robin")
            + "response_header_timeout_secs = 0.2\n"
            + &route(&["*"], &[a.base_url()], "round_robin")),
    )
    .await;
    let url = format!("http://{}/v1/chat/completions", proxy.addr());
    let client = client();
    let r = post(&client, &url, &chat("model-a", false)).await;
    assert_eq!(r.status, 504, "{:?}", r.body);
    assert!(
        String::from_utf8_lossy(&r.body).contains("response_header_timeout_secs"),
        "{:?}",
        r.body
    );
    let r = post(&client, &url, &chat("model-b", false)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let text = metrics(&proxy).await;
    assert_eq!(requests_total(&text, "upstream_timeout", "504"), 1.0);
    proxy.shutdown().await;
}
