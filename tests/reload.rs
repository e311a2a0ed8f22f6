//! Hot reload end to end: simulators and the proxy in-process on `127.0.0.1:0`, the
//! configuration file rewritten and re-read through `POST /-/reload` (and SIGHUP through the
//! binary): new requests take the new routes, streams in flight finish untouched, a bad file is
//! refused with its field named and counted, and settings that need a restart are kept.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use tokentap::Running;
use tokentap::config::{Overrides, Source};
use tokentap::simulate::Simulator;

/// A configuration file of this test's own, removed when dropped.
struct File(PathBuf);

impl File {
    fn new(name: &str, text: &str) -> File {
        let dir = std::env::temp_dir().join(format!("tokentap-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = File(dir.join(format!("{name}.toml")));
        file.write(text);
        file
    }

    /// Replaces the file's text the way an editor or a ConfigMap update does: a new file
    /// renamed over the old one, so a reader never sees half of it.
    fn write(&self, text: &str) {
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.0).unwrap();
    }
}

impl Drop for File {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const COMMON: &str = "[telemetry]\naccess_log = false\n[proxy]\nshutdown_grace_secs = 1.0\n";

/// A file with one route of `balance` over `upstreams`, for `models`.
fn routes(models: &[&str], upstreams: &[&Simulator], balance: &str) -> String {
    let urls: Vec<String> = upstreams.iter().map(|s| s.base_url()).collect();
    format!(
        "{COMMON}[[routes]]\nmodels = {models:?}\nupstreams = {urls:?}\nbalance = \"{balance}\"\n"
    )
}

/// The proxy on `file`, on free loopback ports.
async fn start(file: &File) -> Running {
    tokentap::start_from(Source {
        path: Some(file.0.clone()),
        overrides: Overrides {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            admin_listen: Some("127.0.0.1:0".parse().unwrap()),
            upstream: None,
        },
    })
    .await
    .expect("the proxy starts")
}

/// A simulator serving `MODEL` with exact timings, answering exactly `tokens` tokens.
async fn replica(itl_ms: f64, tokens: u32) -> Simulator {
    let mut c = exact_sim(2.0, itl_ms);
    c.models = vec![MODEL.to_owned()];
    c.output.min_tokens = tokens;
    c.output.max_tokens = tokens;
    sim(c).await
}

/// `POST /-/reload`: its status and body.
async fn reload(proxy: &Running) -> (u16, String) {
    let url = format!("http://{}/-/reload", proxy.admin_addr().unwrap());
    let r = send(&client(), Method::POST, &url, "", &[]).await;
    (
        r.status.as_u16(),
        String::from_utf8_lossy(&r.body).into_owned(),
    )
}

fn reloads(text: &str, result: &str) -> f64 {
    value(text, "tokentap_config_reloads_total", &[("result", result)])
}

fn requests(sim: &Simulator) -> u64 {
    sim.stats().requests
}

fn chat_url(proxy: &Running) -> String {
    format!("http://{}/v1/chat/completions", proxy.addr())
}

#[tokio::test]
async fn new_requests_take_the_new_routes_while_a_stream_in_flight_finishes_untouched() {
    let a = replica(10.0, 40).await;
    let b = replica(1.0, 4).await;
    let file = File::new("swap", &routes(&["*"], &[&a], "round_robin"));
    let proxy = start(&file).await;
    let client = client();
    let body = chat_body(40, true, "");

    // A stream on the first table: its head is in, its tokens still coming (40 × 10 ms).
    let req = Request::post(chat_url(&proxy))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let streaming = client.request(req).await.unwrap();
    assert_eq!(streaming.status(), 200);
    assert_eq!(requests(&a), 1);

    file.write(&routes(&["*"], &[&b], "least_request"));
    let (status, summary) = reload(&proxy).await;
    assert_eq!(status, 200, "{summary}");
    assert!(
        summary.contains("1 routes, 1 upstreams (0 kept"),
        "{summary}"
    );

    // New requests go to the new upstream only.
    for _ in 0..3 {
        let r = post(&client, &chat_url(&proxy), &chat_body(4, false, "")).await;
        assert_eq!(r.status, 200);
    }
    assert_eq!((requests(&a), requests(&b)), (1, 3));

    // The stream ends as the first upstream sends it, byte for byte.
    let streamed = streaming.into_body().collect().await.unwrap().to_bytes();
    let direct = post(
        &client,
        &format!("{}/v1/chat/completions", a.base_url()),
        &body,
    )
    .await;
    assert_eq!(streamed, direct.body);
    assert!(streamed.ends_with(b"data: [DONE]\n\n"));

    let text = scrape(proxy.admin_addr().unwrap()).await;
    assert_eq!(reloads(&text, "ok"), 1.0);
    assert_eq!(reloads(&text, "error"), 0.0);
    assert_eq!(
        value(&text, "tokentap_config_last_reload_successful", &[]),
        1.0
    );
    // The first upstream's stream was counted on it, and is no longer in flight.
    assert_eq!(
        value(
            &text,
            "tokentap_upstream_requests_in_flight",
            &[("upstream", &a.base_url())]
        ),
        0.0
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_over_and_over_under_load_fails_no_request() {
    let sims = [
        replica(1.0, 6).await,
        replica(1.0, 6).await,
        replica(1.0, 6).await,
    ];
    let [a, b, c] = &sims;
    let tables = [
        routes(&["*"], &[a], "round_robin"),
        routes(&["*"], &[b], "least_request"),
        routes(&["*"], &[a, b, c], "peak_ewma"),
        routes(&[MODEL, "other"], &[c, a], "round_robin"),
    ];
    let file = File::new("churn", &tables[0]);
    let proxy = Arc::new(start(&file).await);
    // Four clients send requests, streamed and not, one after another until the reloads are
    // over; every one must be answered whole.
    let (sent, stop) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let mut load = Vec::new();
    for _ in 0..4 {
        let (proxy, sent, stop) = (proxy.clone(), sent.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let client = client();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) || i < 2 {
                let stream = i % 2 == 0;
                let r = post(&client, &chat_url(&proxy), &chat_body(6, stream, "")).await;
                assert_eq!(r.status, 200, "{:?}", r.body);
                if stream {
                    assert!(r.body.ends_with(b"data: [DONE]\n\n"), "{:?}", r.body);
                }
                sent.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    const RELOADS: usize = 24;
    for n in 1..=RELOADS {
        file.write(&tables[n % tables.len()]);
        let (status, summary) = reload(&proxy).await;
        assert_eq!(status, 200, "{summary}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let sent = sent.load(Ordering::Relaxed);
    let text = scrape(proxy.admin_addr().unwrap()).await;
    assert_eq!(reloads(&text, "ok"), RELOADS as f64);
    assert_eq!(reloads(&text, "error"), 0.0);
    assert_eq!(requests_total(&text, "ok", "200"), sent as f64);
    // Every upstream of the tables served some of them.
    assert!(sims.iter().all(|s| requests(s) > 0));

    // The last table is the one in force.
    file.write(&routes(&["*"], &[c], "round_robin"));
    assert_eq!(reload(&proxy).await.0, 200);
    let before = sims.each_ref().map(requests);
    let client = client();
    for _ in 0..4 {
        assert_eq!(
            post(&client, &chat_url(&proxy), &chat_body(2, false, ""))
                .await
                .status,
            200
        );
    }
    let after = sims.each_ref().map(requests);
    assert_eq!(
        [
            after[0] - before[0],
            after[1] - before[1],
            after[2] - before[2]
        ],
        [0, 0, 4]
    );
    Arc::into_inner(proxy).unwrap().shutdown().await;
}

#[tokio::test]
async fn a_bad_file_is_refused_with_its_field_named_and_the_running_routes_stay() {
    let a = replica(1.0, 4).await;
    let good = routes(&["*"], &[&a], "round_robin");
    let file = File::new("bad", &good);
    let proxy = start(&file).await;
    let client = client();
    let route = |models: &str, upstreams: &str, balance: &str| {
        format!(
            "[[routes]]\nmodels = [{models}]\nupstreams = [{upstreams}]\nbalance = \"{balance}\"\n"
        )
    };
    let h1 = "\"http://127.0.0.1:9\"";
    let cases = [
        (route("\"m\"", "", "round_robin"), "routes[0].upstreams"),
        (
            route("\"m\"", h1, "round_robin") + &route("\"m\"", h1, "round_robin"),
            "routes[1].models",
        ),
        (
            route("\"*\"", h1, "round_robin") + &route("\"*\"", h1, "round_robin"),
            "routes[1].models",
        ),
        (route("\"m\"", h1, "fastest"), "balance"),
        (
            route("\"m\"", "\"http://127.0.0.1:9/v1\"", "round_robin"),
            "routes[0].upstreams",
        ),
        (
            "[upstream]\nurl = \"http://127.0.0.1:9\"\n".to_owned()
                + &route("\"m\"", h1, "round_robin"),
            "upstream.url",
        ),
        (
            "[upstream]\nconect_timeout_secs = 1\n".to_owned(),
            "conect_timeout_secs",
        ),
        ("[[routes]\nmodels = [".to_owned(), "line 1"),
    ];
    for (i, (text, field)) in cases.iter().enumerate() {
        file.write(text);
        let (status, reason) = reload(&proxy).await;
        assert_eq!(status, 500, "{text}");
        assert!(reason.contains(field), "{text}: {reason}");
        // The running routes still answer.
        let r = post(&client, &chat_url(&proxy), &chat_body(2, false, "")).await;
        assert_eq!(r.status, 200);
        assert_eq!(requests(&a), i as u64 + 1);
    }
    let text = scrape(proxy.admin_addr().unwrap()).await;
    assert_eq!(reloads(&text, "error"), cases.len() as f64);
    assert_eq!(reloads(&text, "ok"), 0.0);
    assert_eq!(
        value(&text, "tokentap_config_last_reload_successful", &[]),
        0.0
    );

    // A limit read at start is kept when the file changes it; the routes still reload.
    file.write(
        &(good.clone() + "\n[upstream]\npool_max_idle = 8\n").replace(
            "[proxy]\n",
            "[proxy]\nmax_request_body_bytes = 1024\nbody_budget_bytes = 1024\n",
        ),
    );
    let (status, summary) = reload(&proxy).await;
    assert_eq!(status, 200, "{summary}");
    let big = chat_body(2, false, &format!(r#","user":"{}""#, "x".repeat(4096)));
    assert_eq!(post(&client, &chat_url(&proxy), &big).await.status, 200);
    let text = scrape(proxy.admin_addr().unwrap()).await;
    assert_eq!(reloads(&text, "ok"), 1.0);
    assert_eq!(
        value(&text, "tokentap_config_last_reload_successful", &[]),
        1.0
    );

    // A GET does not reload.
    let url = format!("http://{}/-/reload", proxy.admin_addr().unwrap());
    assert_eq!(send(&client, Method::GET, &url, "", &[]).await.status, 405);
    proxy.shutdown().await;
}

#[tokio::test]
async fn without_a_file_a_reload_is_refused_and_counted() {
    let a = replica(1.0, 4).await;
    let proxy = tokentap::start(proxy_config(&a.base_url())).await.unwrap();
    let (status, reason) = reload(&proxy).await;
    assert_eq!(status, 500);
    assert!(reason.contains("--config"), "{reason}");
    let text = scrape(proxy.admin_addr().unwrap()).await;
    assert_eq!(reloads(&text, "error"), 1.0);
    proxy.shutdown().await;
}

/// The address after `key` in a log line (`listen=127.0.0.1:1234`, `admin=Some(…)`).
fn addr_after(line: &str, key: &str) -> String {
    let rest = &line[line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len()..];
    rest.trim_start_matches("Some(")
        .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_file_the_binary_started_with() {
    use std::io::BufRead;
    let a = replica(1.0, 4).await;
    let b = replica(1.0, 4).await;
    let file = File::new("sighup", &routes(&["*"], &[&a], "round_robin"));
    let path = file.0.to_str().unwrap();
    let mut serving = Serving::start(&[
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--config",
        path,
    ]);
    let (listen, admin) = (
        addr_after(&serving.line, "listen="),
        addr_after(&serving.line, "admin="),
    );
    let client = client();
    let url = format!("http://{listen}/v1/chat/completions");
    assert_eq!(
        post(&client, &url, &chat_body(2, false, "")).await.status,
        200
    );
    assert_eq!((requests(&a), requests(&b)), (1, 0));

    // New routes, and a limit that only a restart changes.
    file.write(
        &routes(&["*"], &[&b], "round_robin")
            .replace("[proxy]\n", "[proxy]\nmax_request_body_bytes = 2048\n"),
    );
    serving.signal("-HUP");
    // The reload's log says what needs a restart, and that the new routes are in force.
    let mut line = String::new();
    let mut warned = false;
    for _ in 0..100 {
        line.clear();
        serving.stderr.read_line(&mut line).unwrap();
        warned |= line.contains("WARN") && line.contains("proxy") && line.contains("restart");
        if line.contains("configuration reload") || line.is_empty() {
            break;
        }
    }
    assert!(line.contains("configuration reloaded"), "{line}");
    assert!(warned, "no warning that [proxy] needs a restart");
    assert!(line.contains("SIGHUP"), "{line}");
    let text = scrape(admin.parse().unwrap()).await;
    assert_eq!(reloads(&text, "ok"), 1.0);
    assert_eq!(
        post(&client, &url, &chat_body(2, false, "")).await.status,
        200
    );
    assert_eq!((requests(&a), requests(&b)), (1, 1));

    serving.signal("-TERM");
    assert_eq!(serving.child.wait().unwrap().code(), Some(0));
}
