//! Upstreams named by DNS: a name that resolves to several addresses is one endpoint per
//! address, re-resolved periodically. The resolver is the test's own, handing out changing sets
//! of loopback addresses (127.0.0.1-3, one simulator on each, all on the same port): no network.

mod common;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokentap::Running;
use tokentap::config::{Overrides, Source};
use tokentap::simulate::Simulator;
use tokentap::upstream::dns::Resolve;

/// Answers every name with the addresses set last (or an error).
#[derive(Debug)]
struct Replicas(Mutex<io::Result<Vec<IpAddr>>>);

impl Replicas {
    fn set(&self, answer: io::Result<&[&str]>) {
        *self.0.lock().unwrap() =
            answer.map(|list| list.iter().map(|a| a.parse().unwrap()).collect());
    }
}

impl Resolve for Replicas {
    fn resolve<'a>(
        &'a self,
        _host: &'a str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>> {
        let answer = match &*self.0.lock().unwrap() {
            Ok(list) => Ok(list.clone()),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        };
        Box::pin(async move { answer })
    }
}

/// Three simulators on 127.0.0.1, .2 and .3, all on one port.
async fn three_on_one_port() -> (u16, [Simulator; 3]) {
    for _ in 0..20 {
        let mut c = exact_sim(1.0, 1.0);
        c.models = vec![MODEL.to_owned()];
        let a = sim(c.clone()).await;
        let port = a.addr().port();
        let at = |ip: &str| SocketAddr::new(ip.parse().unwrap(), port);
        let Ok(b) = Simulator::start(c.clone(), at("127.0.0.2")).await else {
            continue;
        };
        let Ok(c) = Simulator::start(c, at("127.0.0.3")).await else {
            continue;
        };
        return (port, [a, b, c]);
    }
    panic!("no port free on 127.0.0.1, .2 and .3 together");
}

async fn start(config: &str, resolver: Arc<Replicas>) -> (Running, std::path::PathBuf) {
    let file = std::env::temp_dir().join(format!("tokentap-dns-{}.toml", std::process::id()));
    std::fs::write(&file, config).unwrap();
    let proxy = tokentap::start_with(
        Source {
            path: Some(file.clone()),
            overrides: Overrides {
                listen: Some("127.0.0.1:0".parse().unwrap()),
                admin_listen: Some("127.0.0.1:0".parse().unwrap()),
                upstream: None,
            },
        },
        resolver,
    )
    .await
    .expect("the proxy starts");
    (proxy, file)
}

fn served(sims: &[Simulator; 3]) -> [u64; 3] {
    sims.each_ref().map(|s| s.stats().requests)
}

/// Sends `n` requests one after another; all must succeed.
async fn send_n(proxy: &Running, n: usize) {
    let (client, url) = (
        client(),
        format!("http://{}/v1/chat/completions", proxy.addr()),
    );
    for _ in 0..n {
        let r = post(&client, &url, &chat_body(2, false, "")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
}

/// Waits (at most 10 s) until the proxy's `metric` of the DNS name is at least `want`, or
/// exactly `want` when `exact`.
async fn until(proxy: &Running, metric: &str, want: f64, exact: bool) {
    for _ in 0..1000 {
        let text = scrape(proxy.admin_addr().unwrap()).await;
        let v = value(&text, metric, &[("name", "replicas.test")]);
        if v == want || (!exact && v > want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{metric} never became {want}");
}

fn diff(after: [u64; 3], before: [u64; 3]) -> [u64; 3] {
    [0, 1, 2].map(|i| after[i] - before[i])
}

#[tokio::test]
async fn a_name_is_one_endpoint_per_address_and_follows_its_addresses() {
    let (port, sims) = three_on_one_port().await;
    let resolver = Arc::new(Replicas(Mutex::new(Ok(Vec::new()))));
    resolver.set(Ok(&["127.0.0.1", "127.0.0.2"]));
    let config = format!(
        "[telemetry]\naccess_log = false\n[proxy]\nshutdown_grace_secs = 1.0\n\
         [upstream]\ndns_refresh_secs = 0.05\ndns_max_addresses = 3\n\
         [[routes]]\nmodels = [\"*\"]\nupstreams = [\"http://replicas.test:{port}\"]\n\
         balance = \"round_robin\"\n"
    );
    let (proxy, file) = start(&config, resolver.clone()).await;

    // Two addresses: two endpoints, each its turn.
    let before = served(&sims);
    send_n(&proxy, 4).await;
    assert_eq!(diff(served(&sims), before), [2, 2, 0]);

    // A third replica appears (and a fourth, past the cap of three: left out, counted).
    resolver.set(Ok(&["127.0.0.4", "127.0.0.2", "127.0.0.3", "127.0.0.1"]));
    until(&proxy, "tokentap_upstream_dns_addresses", 3.0, true).await;
    let text = scrape(proxy.admin_addr().unwrap()).await;
    assert!(
        value(
            &text,
            "tokentap_upstream_dns_truncated_total",
            &[("name", "replicas.test")]
        ) >= 1.0
    );
    let before = served(&sims);
    send_n(&proxy, 6).await;
    assert_eq!(diff(served(&sims), before), [2, 2, 2]);

    // The name stops resolving: the last good set stays, and the failures are counted.
    resolver.set(Err(io::Error::other("SERVFAIL")));
    until(&proxy, "tokentap_upstream_dns_failures_total", 2.0, false).await;
    let before = served(&sims);
    send_n(&proxy, 3).await;
    assert_eq!(diff(served(&sims), before), [1, 1, 1]);

    // Down to one replica.
    resolver.set(Ok(&["127.0.0.3"]));
    until(&proxy, "tokentap_upstream_dns_addresses", 1.0, true).await;
    let before = served(&sims);
    send_n(&proxy, 2).await;
    assert_eq!(diff(served(&sims), before), [0, 0, 2]);

    // The `upstream` label is the name and a slot (0..3), never an address: each replica kept
    // its slot, so each slot's count is its replica's.
    let text = scrape(proxy.admin_addr().unwrap()).await;
    let base = format!("http://replicas.test:{port}");
    let labels: Vec<String> = samples(&text)
        .into_iter()
        .filter(|s| s.name == "tokentap_upstream_requests_total")
        .filter_map(|s| s.labels.into_iter().find(|(k, _)| k == "upstream"))
        .map(|(_, v)| v)
        .collect();
    assert!(!labels.is_empty());
    for label in &labels {
        assert!(
            [0, 1, 2]
                .iter()
                .any(|slot| *label == format!("{base}#{slot}")),
            "{label}"
        );
    }
    let served = served(&sims);
    for (slot, sim) in served.iter().enumerate() {
        let sent = value(
            &text,
            "tokentap_upstream_requests_total",
            &[("upstream", &format!("{base}#{slot}"))],
        );
        // The proxy's own /v1/models polls are sent to each endpoint too.
        assert!(sent >= *sim as f64, "slot {slot}: {sent} < {sim}");
    }
    proxy.shutdown().await;
    let _ = std::fs::remove_file(file);
}
