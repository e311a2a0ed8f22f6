//! Attacks on the front door (docs/limits.md): silent and slow clients, stalled and huge
//! bodies, endless SSE events, oversized heads, HTTP/2 abuse, and the open-file limit. Each test
//! asserts the documented limit holds: the connection is closed (not before its limit), the
//! client gets the status the page promises, the request ends with its outcome, and memory
//! stays bounded. Limits are shortened in the configuration so that the tests run in seconds.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokentap::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// A proxy in front of `upstream` with the client limits shortened to `limit`.
fn short_limits(upstream: &str, limit: f64) -> Config {
    let mut c = proxy_config(upstream);
    c.telemetry.discover_models = false;
    c.proxy.header_timeout_secs = limit;
    c.proxy.keepalive_idle_secs = limit;
    c.proxy.body_read_timeout_secs = limit;
    c.proxy.send_timeout_secs = limit;
    c.proxy.http2_keepalive_secs = limit;
    c
}

/// Reads until the peer closes (or fails); returns what came and when the end came.
async fn read_to_close(c: &mut TcpStream) -> (Vec<u8>, Instant) {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match c.read(&mut buf).await {
            Ok(0) | Err(_) => return (got, Instant::now()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Asserts that `c` is closed by the proxy no sooner than `limit` after `from`, and well
/// within a generous bound after it; returns what the proxy wrote before closing.
async fn closed_after(c: &mut TcpStream, from: Instant, limit: Duration) -> Vec<u8> {
    let (got, at) = tokio::time::timeout(limit + Duration::from_secs(10), read_to_close(c))
        .await
        .expect("the proxy closed the connection");
    assert!(
        at - from >= limit.mul_f64(0.9),
        "closed after {:?}, before its limit of {limit:?}",
        at - from
    );
    got
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn closed_total(m: &str, reason: &str) -> f64 {
    value(
        m,
        "tokentap_connections_closed_total",
        &[("reason", reason)],
    )
}

/// A metric read after the proxy has had a moment to count what just happened.
async fn eventually(admin: SocketAddr, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(admin).await;
        if check(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "never: {what}\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_silent_connection_is_closed_at_the_header_timeout() {
    let sim = sim(exact_sim(1.0, 1.0)).await;
    let proxy = tokentap::start(short_limits(&sim.base_url(), 0.5))
        .await
        .unwrap();
    let start = Instant::now();
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    let got = closed_after(&mut c, start, Duration::from_millis(500)).await;
    assert!(
        got.is_empty(),
        "nothing is answered to a client that sent nothing"
    );
    let m = eventually(proxy.admin_addr().unwrap(), "counted", |m| {
        closed_total(m, "header_timeout") == 1.0
    })
    .await;
    assert_eq!(requests_total(&m, "rejected", "408"), 0.0);
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_head_sent_a_byte_at_a_time_gets_408_at_the_header_timeout() {
    let sim = sim(exact_sim(1.0, 1.0)).await;
    let proxy = tokentap::start(short_limits(&sim.base_url(), 0.6))
        .await
        .unwrap();
    let start = Instant::now();
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    let trickle = async {
        for byte in b"GET /v1/models HTTP/1.1\r\nHost: x\r\n".iter() {
            if c.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_millis(700), trickle)
        .await
        .unwrap_err();
    let got = text(&closed_after(&mut c, start, Duration::from_millis(600)).await);
    assert!(got.starts_with("HTTP/1.1 408 "), "{got}");
    let body = got.split_once("\r\n\r\n").unwrap().1;
    let v: serde_json::Value = serde_json::from_str(body).expect(body);
    assert_eq!(v["error"]["code"], 408);
    let m = eventually(proxy.admin_addr().unwrap(), "counted", |m| {
        requests_total(m, "rejected", "408") == 1.0
    })
    .await;
    assert_eq!(closed_total(&m, "header_timeout"), 1.0);
    assert_eq!(sim.stats().requests, 0, "nothing reached the upstream");
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_kept_alive_connection_is_closed_at_the_idle_limit_not_before() {
    let sim = sim(exact_sim(1.0, 1.0)).await;
    let mut config = short_limits(&sim.base_url(), 5.0);
    config.proxy.keepalive_idle_secs = 0.8;
    config.proxy.header_timeout_secs = 0.3;
    let proxy = tokentap::start(config).await.unwrap();
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    c.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !text(&got).contains("\"data\"") {
        let n = c.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the answer");
        got.extend_from_slice(&buf[..n]);
    }
    // Idle for longer than the head limit: the idle limit, not the head limit, applies.
    let idle_from = Instant::now();
    let got = closed_after(&mut c, idle_from, Duration::from_millis(800)).await;
    assert!(got.is_empty(), "closed without an answer: {}", text(&got));
    eventually(proxy.admin_addr().unwrap(), "counted", |m| {
        closed_total(m, "keepalive_idle") == 1.0 && closed_total(m, "header_timeout") == 0.0
    })
    .await;
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn the_next_head_on_a_kept_alive_connection_has_the_header_timeout_from_its_first_byte() {
    let sim = sim(exact_sim(1.0, 1.0)).await;
    let mut config = short_limits(&sim.base_url(), 5.0);
    config.proxy.keepalive_idle_secs = 5.0;
    config.proxy.header_timeout_secs = 0.5;
    let proxy = tokentap::start(config).await.unwrap();
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    c.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = c.read(&mut buf).await.unwrap();
    assert!(text(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Within the idle limit, longer than the head limit: still open.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let first_byte = Instant::now();
    c.write_all(b"GET /v1/mo").await.unwrap();
    let got = text(&closed_after(&mut c, first_byte, Duration::from_millis(500)).await);
    assert!(got.starts_with("HTTP/1.1 408 "), "{got}");
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_stalled_request_body_gets_408_and_nothing_reaches_the_upstream() {
    let sim = sim(exact_sim(1.0, 1.0)).await;
    let proxy = tokentap::start(short_limits(&sim.base_url(), 0.5))
        .await
        .unwrap();
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    c.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    let stalled = Instant::now();
    let got = text(&closed_after(&mut c, stalled, Duration::from_millis(500)).await);
    assert!(got.starts_with("HTTP/1.1 408 "), "{got}");
    assert!(got.contains("connection: close"), "{got}");
    let m = eventually(proxy.admin_addr().unwrap(), "counted", |m| {
        requests_total(m, "rejected", "408") == 1.0
    })
    .await;
    assert_eq!(value(&m, "tokentap_request_body_bytes_held", &[]), 0.0);
    assert_eq!(sim.stats().requests, 0);
    proxy.shutdown().await;
    sim.shutdown().await;
}

/// A pass-through endpoint streams the client's body on: a stall there is the client's too.
#[tokio::test]
async fn a_stalled_streamed_body_is_the_clients_fault_not_the_upstreams() {
    let (addr, _seen) = echo_upstream().await;
    let proxy = tokentap::start(short_limits(&format!("http://{addr}"), 0.5))
        .await
        .unwrap();
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    c.write_all(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n")
        .await
        .unwrap();
    let (got, _) = tokio::time::timeout(Duration::from_secs(10), read_to_close(&mut c))
        .await
        .unwrap();
    let got = text(&got);
    assert!(got.starts_with("HTTP/1.1 408 "), "{got}");
    let m = eventually(proxy.admin_addr().unwrap(), "counted", |m| {
        requests_total(m, "rejected", "408") == 1.0
    })
    .await;
    assert_eq!(requests_total(&m, "upstream_disconnect", "502"), 0.0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_malformed_chunked_body_is_a_400_rejected_not_an_upstream_error() {
    let (addr, _seen) = echo_upstream().await;
    let proxy = tokentap::start(short_limits(&format!("http://{addr}"), 5.0))
        .await
        .unwrap();
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    c.write_all(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n")
        .await
        .unwrap();
    let (got, _) = tokio::time::timeout(Duration::from_secs(10), read_to_close(&mut c))
        .await
        .unwrap();
    let got = text(&got);
    // The server may close before the answer is written; the count is what must hold.
    assert!(got.is_empty() || got.starts_with("HTTP/1.1 400 "), "{got}");
    let m = eventually(proxy.admin_addr().unwrap(), "counted", |m| {
        requests_total(m, "rejected", "400") == 1.0
    })
    .await;
    for outcome in ["upstream_disconnect", "upstream_timeout", "connect_error"] {
        assert_eq!(
            value(&m, "tokentap_requests_total", &[("outcome", outcome)]),
            0.0,
            "{outcome}"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_declared_length_over_the_limit_is_refused_before_any_byte_is_read() {
    let sim = sim(exact_sim(1.0, 1.0)).await;
    let mut config = short_limits(&sim.base_url(), 5.0);
    config.proxy.max_request_body_bytes = 1024;
    let proxy = tokentap::start(config).await.unwrap();
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    c.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 40000000\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    let got = text(&buf[..n]);
    assert!(got.starts_with("HTTP/1.1 413 "), "{got}");
    let m = scrape(proxy.admin_addr().unwrap()).await;
    assert_eq!(requests_total(&m, "rejected", "413"), 1.0);
    assert_eq!(sim.stats().requests, 0);
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn bodies_held_at_once_stay_within_the_budget_and_the_rest_get_429() {
    let sim = sim(exact_sim(1.0, 1.0)).await;
    let mut config = short_limits(&sim.base_url(), 5.0);
    config.proxy.max_request_body_bytes = 1 << 20;
    config.proxy.body_budget_bytes = 3 << 20;
    let proxy = tokentap::start(config).await.unwrap();
    let admin = proxy.admin_addr().unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        1 << 20
    );
    // Five clients each announce a 1 MiB body, send a little of it, and stall.
    let mut stalled = Vec::new();
    let mut refused = 0;
    for _ in 0..5 {
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        c.write_all(head.as_bytes()).await.unwrap();
        c.write_all(&[b' '; 100_000]).await.unwrap();
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(300), c.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                let got = text(&buf[..n]);
                assert!(got.starts_with("HTTP/1.1 429 "), "{got}");
                assert!(got.contains("retry-after: 1"), "{got}");
                refused += 1;
            }
            Ok(_) => panic!("closed without an answer"),
            Err(_) => stalled.push(c),
        }
    }
    assert_eq!((stalled.len(), refused), (3, 2));
    let m = scrape(admin).await;
    assert_eq!(
        value(&m, "tokentap_request_body_bytes_held", &[]),
        f64::from(3u32 << 20)
    );
    assert_eq!(requests_total(&m, "rejected", "429"), 2.0);
    drop(stalled);
    eventually(admin, "the budget given back", |m| {
        value(m, "tokentap_request_body_bytes_held", &[]) == 0.0
    })
    .await;
    // And it serves again.
    let r = post(
        &client(),
        &format!("http://{}/v1/chat/completions", proxy.addr()),
        &chat_body(2, false, ""),
    )
    .await;
    assert_eq!(r.status, 200);
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_request_head_over_64_kib_gets_431() {
    let sim = sim(exact_sim(1.0, 1.0)).await;
    let proxy = tokentap::start(short_limits(&sim.base_url(), 5.0))
        .await
        .unwrap();
    for (size, want) in [(60 * 1024, "HTTP/1.1 200 "), (70 * 1024, "HTTP/1.1 431 ")] {
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        let head = format!(
            "GET /v1/models HTTP/1.1\r\nHost: x\r\nx-big: {}\r\nConnection: close\r\n\r\n",
            "v".repeat(size)
        );
        let _ = c.write_all(head.as_bytes()).await;
        let (got, _) = tokio::time::timeout(Duration::from_secs(10), read_to_close(&mut c))
            .await
            .unwrap();
        assert!(text(&got).starts_with(want), "{size}: {}", text(&got));
    }
    let m = eventually(proxy.admin_addr().unwrap(), "counted", |m| {
        requests_total(m, "rejected", "431") == 1.0
    })
    .await;
    assert_eq!(closed_total(&m, "bad_request"), 1.0);
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn connect_is_refused_with_405() {
    let sim = sim(exact_sim(1.0, 1.0)).await;
    let proxy = tokentap::start(short_limits(&sim.base_url(), 5.0))
        .await
        .unwrap();
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    c.write_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = c.read(&mut buf).await.unwrap();
    let got = text(&buf[..n]);
    assert!(got.starts_with("HTTP/1.1 405 "), "{got}");
    let m = scrape(proxy.admin_addr().unwrap()).await;
    assert_eq!(requests_total(&m, "rejected", "405"), 1.0);
    assert_eq!(sim.stats().requests, 0);
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn expect_is_answered_by_the_proxy_and_not_forwarded() {
    let (addr, seen) = echo_upstream().await;
    let proxy = tokentap::start(short_limits(&format!("http://{addr}"), 5.0))
        .await
        .unwrap();
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    c.write_all(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = c.read(&mut buf).await.unwrap();
    assert!(
        text(&buf[..n]).starts_with("HTTP/1.1 100 Continue"),
        "{}",
        text(&buf[..n])
    );
    c.write_all(b"abcd").await.unwrap();
    let mut got = Vec::new();
    while !text(&got).contains("abcd") {
        let n = c.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let heads: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|h| h.contains("/v1/embeddings"))
        .cloned()
        .collect();
    assert_eq!(heads.len(), 1);
    assert!(!heads[0].contains("expect"), "{}", heads[0]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_502_does_not_name_the_upstreams_address() {
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = tokentap::start(short_limits(&format!("http://{closed}"), 5.0))
        .await
        .unwrap();
    let r = post(
        &client(),
        &format!("http://{}/v1/chat/completions", proxy.addr()),
        &chat_body(2, true, ""),
    )
    .await;
    assert_eq!(r.status, 502);
    let body = text(&r.body);
    assert!(!body.contains(&closed.port().to_string()), "{body}");
    assert!(!body.contains("127.0.0.1"), "{body}");
    assert!(body.contains("could not connect to the upstream"), "{body}");
    proxy.shutdown().await;
}

/// A client that stops reading an endless stream is cut at the send limit, and the upstream
/// request with it.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_at_the_send_timeout() {
    let addr = endless_upstream(b"data: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n\n").await;
    let proxy = tokentap::start(short_limits(&format!("http://{addr}"), 0.5))
        .await
        .unwrap();
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    let body = chat_body(5, true, "");
    c.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = [0u8; 1024];
    assert!(c.read(&mut buf).await.unwrap() > 0, "the stream began");
    // The client reads no more; the proxy's writes fill its window, then stall.
    let m = eventually(proxy.admin_addr().unwrap(), "cut", |m| {
        closed_total(m, "send_timeout") == 1.0
    })
    .await;
    let m = if requests_total(&m, "client_disconnect", "200") == 1.0 {
        m
    } else {
        eventually(proxy.admin_addr().unwrap(), "reported", |m| {
            requests_total(m, "client_disconnect", "200") == 1.0
        })
        .await
    };
    assert_eq!(value(&m, "tokentap_requests_in_flight", &[]), 0.0);
    drop(c);
    proxy.shutdown().await;
}

/// The proxy as a child process (`tokentap serve`), so that its memory and its open-file limit
/// are its own: the address it listens on, the admin address, and its stderr.
struct Child {
    process: std::process::Child,
    addr: SocketAddr,
    admin: SocketAddr,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Child {
    fn start(prlimit: Option<&str>, config: &str) -> Child {
        use std::io::BufRead;
        let dir = std::env::temp_dir().join(format!(
            "tokentap-adv-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokentap.toml");
        std::fs::write(&path, config).unwrap();
        let bin = env!("CARGO_BIN_EXE_tokentap");
        let mut cmd = match prlimit {
            Some(limit) => {
                let mut c = std::process::Command::new("prlimit");
                c.arg(format!("--nofile={limit}")).arg(bin);
                c
            }
            None => std::process::Command::new(bin),
        };
        let mut process = cmd
            .args(["serve", "--config"])
            .arg(&path)
            .env("TOKENTAP_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("tokentap starts");
        let mut stderr = std::io::BufReader::new(process.stderr.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            assert!(stderr.read_line(&mut line).unwrap() > 0, "exited early");
            if line.contains("tokentap serving") {
                break;
            }
        }
        let field = |name: &str| -> SocketAddr {
            let at = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
            let rest = line[at..].trim_start_matches("Some(");
            let end = rest.find([' ', ')']).unwrap_or(rest.len());
            rest[..end].trim().parse().unwrap()
        };
        let (addr, admin) = (field("listen"), field("admin"));
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Child {
            process,
            addr,
            admin,
            log,
        }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.process.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn child_config(upstream: SocketAddr, extra: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://{upstream}\"\n[proxy]\n{extra}\n[telemetry]\ndiscover_models = false\naccess_log = false\nmodels = [\"{MODEL}\"]\n"
    )
}

/// An SSE event that never ends: 64 MB of one `data:` line. What the proxy holds of it stays
/// bounded (it used to hold all of it, twice over with usage injection), and the client gets
/// every byte.
#[tokio::test]
async fn an_endless_sse_event_does_not_grow_memory() {
    const TOTAL: usize = 64 << 20;
    let addr = long_line_upstream(TOTAL).await;
    let child = Child::start(None, &child_config(addr, "max_sse_event_bytes = 65536"));
    // The client does not ask for usage: the proxy injects it and runs its usage cutter.
    let req = Request::post(format!("http://{}/v1/chat/completions", child.addr))
        .body(Full::new(Bytes::from(chat_body(5, true, ""))))
        .unwrap();
    let baseline = child.rss_kib();
    let resp = client().request(req).await.unwrap();
    let mut body = resp.into_body();
    let (mut received, mut peak) = (0usize, baseline);
    let mut tail = Vec::new();
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().unwrap();
        received += data.len();
        tail.extend_from_slice(&data);
        if tail.len() > 64 {
            tail.drain(..tail.len() - 64);
        }
        peak = peak.max(child.rss_kib());
    }
    assert_eq!(
        received,
        TOTAL + "data: ".len() + "\n\ndata: [DONE]\n\n".len()
    );
    assert!(
        text(&tail).ends_with("xxxx\n\ndata: [DONE]\n\n"),
        "{}",
        text(&tail)
    );
    let grown = peak.saturating_sub(baseline);
    assert!(
        grown < 24 * 1024,
        "RSS grew by {grown} KiB while forwarding a {TOTAL}-byte event"
    );
    let m = scrape(child.admin).await;
    assert_eq!(value(&m, "tokentap_sse_oversized_events_total", &[]), 1.0);
    assert_eq!(requests_total(&m, "ok", "200"), 1.0);
}

/// At the open-file limit the proxy refuses connections beyond `proxy.max_connections` at
/// once, keeps serving the others, logs accept failures at most every 10 s, and recovers.
#[tokio::test]
async fn at_the_open_file_limit_clients_are_refused_cleanly_and_service_recovers() {
    let sim = sim(exact_sim(1.0, 1.0)).await;
    let upstream: SocketAddr = sim
        .base_url()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    // 64 descriptors, the default connection limit from them: 16.
    let child = Child::start(
        Some("64:64"),
        &child_config(upstream, "header_timeout_secs = 1.0"),
    );
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(TcpStream::connect(child.addr).await.unwrap());
    }
    // The ones beyond the limit are closed at once; the first 16 wait for their head timeout.
    let mut closed_now = 0;
    for c in &mut held {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(200), c.read(&mut b)).await {
            closed_now += 1;
        }
    }
    assert!(closed_now >= 20, "only {closed_now} of 40 refused at once");
    let m = scrape(child.admin).await;
    assert!(
        value(
            &m,
            "tokentap_connections_closed_total",
            &[("reason", "max_connections")]
        ) >= 20.0
    );
    // Now past the descriptor limit itself: explicit connections that the limit cannot hold.
    drop(held);
    let child = Child::start(
        Some("48:48"),
        &child_config(
            upstream,
            "header_timeout_secs = 1.0\nmax_connections = 1000",
        ),
    );
    let mut flood = Vec::new();
    for _ in 0..80 {
        if let Ok(c) = TcpStream::connect(child.addr).await {
            flood.push(c);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let accept_lines = child
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("accept failed"))
        .count();
    assert!(
        accept_lines <= 1,
        "{accept_lines} accept-failure lines in 2 s"
    );
    drop(flood);
    // Once the flood is gone (and its connections timed out), a normal client is served.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = post(
        &client(),
        &format!("http://{}/v1/chat/completions", child.addr),
        &chat_body(2, false, ""),
    )
    .await;
    assert_eq!(r.status, 200);
    let m = scrape(child.admin).await;
    assert!(value(&m, "tokentap_accept_errors_total", &[]) >= 1.0);
    sim.shutdown().await;
}

/// HTTP/2 client over a fresh connection to `addr`.
async fn h2_client(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<BoxedBody>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    (send, tokio::spawn(conn))
}

type BoxedBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

#[tokio::test]
async fn an_http2_connection_without_streams_is_closed_at_the_idle_limit() {
    let sim = sim(exact_sim(1.0, 1.0)).await;
    let mut config = short_limits(&sim.base_url(), 5.0);
    config.proxy.keepalive_idle_secs = 0.6;
    let proxy = tokentap::start(config).await.unwrap();
    let (mut send, conn) = h2_client(proxy.addr()).await;
    let req = Request::get(format!("http://{}/v1/models", proxy.addr()))
        .body(Full::new(Bytes::new()).boxed())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    resp.into_body().collect().await.unwrap();
    let idle_from = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the proxy closed the idle connection")
        .unwrap()
        .ok();
    assert!(idle_from.elapsed() >= Duration::from_millis(540));
    eventually(proxy.admin_addr().unwrap(), "counted", |m| {
        closed_total(m, "http2_idle") == 1.0
    })
    .await;
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn an_http2_stream_whose_body_never_comes_gets_408() {
    let sim = sim(exact_sim(1.0, 1.0)).await;
    let proxy = tokentap::start(short_limits(&sim.base_url(), 0.5))
        .await
        .unwrap();
    let (mut send, _conn) = h2_client(proxy.addr()).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    tx.send(Bytes::from_static(b"{\"model\":")).await.unwrap();
    let body = Channel(rx).boxed();
    let req = Request::post(format!("http://{}/v1/chat/completions", proxy.addr()))
        .body(body)
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 408);
    drop(tx);
    let m = scrape(proxy.admin_addr().unwrap()).await;
    assert_eq!(requests_total(&m, "rejected", "408"), 1.0);
    assert_eq!(sim.stats().requests, 0);
    proxy.shutdown().await;
    sim.shutdown().await;
}

/// Many streams opened and dropped at once (a rapid-reset flood) do not stop the proxy from
/// serving, and leave nothing in flight.
#[tokio::test]
async fn an_http2_reset_flood_leaves_the_proxy_serving() {
    let sim = sim(exact_sim(1.0, 1.0)).await;
    let proxy = tokentap::start(short_limits(&sim.base_url(), 5.0))
        .await
        .unwrap();
    let (send, conn) = h2_client(proxy.addr()).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..2000 {
        let mut send = send.clone();
        let url = format!("http://{}/v1/chat/completions", proxy.addr());
        tasks.spawn(async move {
            let req = Request::post(url)
                .body(Full::new(Bytes::from(chat_body(50, true, ""))).boxed())
                .unwrap();
            // Dropped at once: the stream is reset.
            let _ = tokio::time::timeout(Duration::from_micros(1), send.send_request(req)).await;
        });
    }
    while tasks.join_next().await.is_some() {}
    drop(send);
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
    let r = post(
        &client(),
        &format!("http://{}/v1/chat/completions", proxy.addr()),
        &chat_body(2, false, ""),
    )
    .await;
    assert_eq!(r.status, 200);
    eventually(proxy.admin_addr().unwrap(), "nothing left in flight", |m| {
        value(m, "tokentap_requests_in_flight", &[]) == 0.0
    })
    .await;
    proxy.shutdown().await;
    sim.shutdown().await;
}

/// A request body whose frames come from a channel; it ends when the sender is dropped.
struct Channel(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for Channel {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// An upstream (hyper) that answers `200` with the request body as the response body, and
/// records each request head it got (lowercase), in order.
async fn echo_upstream() -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let addr = serve_upstream(move |req: Request<Incoming>| {
        let record = record.clone();
        async move {
            let head = format!("{} {} {:?}", req.method(), req.uri(), req.headers()).to_lowercase();
            record.lock().unwrap().push(head);
            let body = req.into_body().collect().await.map(|c| c.to_bytes());
            let body = body.unwrap_or_default();
            Response::new(Full::new(body).map_err(|never| match never {}).boxed())
        }
    })
    .await;
    (addr, seen)
}

/// An upstream that answers every request with an event stream repeating `event` for ever.
async fn endless_upstream(event: &'static [u8]) -> SocketAddr {
    serve_upstream(move |_req: Request<Incoming>| async move {
        let stream = futures_util_repeat(Bytes::from_static(event));
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(BodyExt::boxed(stream))
            .unwrap()
    })
    .await
}

/// An upstream that answers with one `data:` line of `len` bytes, then a blank line and
/// `[DONE]`, written as fast as the proxy reads.
async fn long_line_upstream(len: usize) -> SocketAddr {
    serve_upstream(move |_req: Request<Incoming>| async move {
        let body = LongLine {
            left: len,
            state: 0,
        };
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(BodyExt::boxed(body))
            .unwrap()
    })
    .await
}

struct LongLine {
    left: usize,
    state: u8,
}

impl Body for LongLine {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        static CHUNK: [u8; 65536] = [b'x'; 65536];
        let frame = match self.state {
            0 => {
                self.state = 1;
                Bytes::from_static(b"data: ")
            }
            1 if self.left > 0 => {
                let n = self.left.min(CHUNK.len());
                self.left -= n;
                Bytes::from_static(&CHUNK[..n])
            }
            1 => {
                self.state = 2;
                Bytes::from_static(b"\n\ndata: [DONE]\n\n")
            }
            _ => return std::task::Poll::Ready(None),
        };
        std::task::Poll::Ready(Some(Ok(Frame::data(frame))))
    }
}

/// A body that repeats `chunk` for ever.
fn futures_util_repeat(chunk: Bytes) -> Repeat {
    Repeat(chunk)
}

struct Repeat(Bytes);

impl Body for Repeat {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(Some(Ok(Frame::data(self.0.clone()))))
    }
}

/// A hyper HTTP/1.1 upstream on 127.0.0.1:0 answering with `respond`.
async fn serve_upstream<F, Fut>(respond: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<BoxedBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let respond = respond.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let fut = respond(req);
                    async move { Ok::<_, std::convert::Infallible>(fut.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}
