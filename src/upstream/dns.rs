//! Upstreams named by DNS: a name that resolves to several addresses is one endpoint per
//! address (the pods of a Kubernetes headless Service), resolved again periodically. The
//! resolver is a trait so that tests can hand out changing address sets without a network.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

use http::Uri;

use crate::config::Config;

/// Resolves a host name to its addresses.
pub trait Resolve: Send + Sync + std::fmt::Debug {
    /// The addresses of `host` (a name, not an IP literal).
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + 'a>>;
}

/// The system's resolver (`getaddrinfo`, on tokio's blocking pool).
#[derive(Debug, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + 'a>> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host, 0))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    }
}

/// The addresses each upstream host name had at its last good resolution: the endpoints a
/// name stands for. A name without an entry is one endpoint, resolved at each connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved(BTreeMap<Box<str>, Vec<IpAddr>>);

impl Resolved {
    /// The addresses of `host`, sorted; `None` when it never resolved.
    pub fn get(&self, host: &str) -> Option<&[IpAddr]> {
        self.0.get(host).map(Vec::as_slice)
    }

    /// Sets the addresses of `host`.
    pub fn insert(&mut self, host: &str, addresses: Vec<IpAddr>) {
        self.0.insert(host.into(), addresses);
    }
}

/// What one resolution of every name found, for the logs and the metrics.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The addresses in force after it: the new ones of each name that answered, the last good
    /// ones of each name that did not.
    pub resolved: Resolved,
    /// Each name that did not answer with an address, and why; its last good set stays.
    pub failed: Vec<(String, String)>,
    /// Each name that answered with more addresses than the cap, and how many it had.
    pub truncated: Vec<(String, usize)>,
}

/// The host names (not IP literals) of the configuration's upstream URLs.
pub fn names(config: &Config) -> Vec<String> {
    let urls = config
        .routes
        .iter()
        .flat_map(|r| r.upstreams.iter())
        .chain(config.routes.is_empty().then_some(&config.upstream.url));
    let mut names: Vec<String> = urls
        .filter_map(|url| url.parse::<Uri>().ok())
        .filter_map(|uri| uri.host().map(str::to_owned))
        .filter(|host| is_name(host))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Whether `host` (as a URI gives it) is a DNS name rather than an IP literal.
pub fn is_name(host: &str) -> bool {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_err()
}

/// Resolves every host name of `config`, each within `limit`. An answer with addresses gives
/// the name's endpoints: its IPv4 addresses when it has any, else its IPv6 ones (Envoy's
/// `V4_PREFERRED`: a `localhost` that also resolves to `::1` is not two replicas), at most
/// `upstream.dns_max_addresses` of them, those of `last` first so that a full set keeps the
/// endpoints it has. A failure, a timeout or an empty answer keeps `last`'s addresses.
pub async fn resolve_all(
    config: &Config,
    resolver: &dyn Resolve,
    last: &Resolved,
    limit: Duration,
) -> Outcome {
    let max = config.upstream.dns_max_addresses;
    let mut outcome = Outcome::default();
    for name in names(config) {
        let answer = tokio::time::timeout(limit, resolver.resolve(&name)).await;
        let mut addresses = match answer {
            Ok(Ok(addresses)) if !addresses.is_empty() => addresses,
            failure => {
                let why = match failure {
                    Ok(Ok(_)) => "no address".to_owned(),
                    Ok(Err(error)) => error.to_string(),
                    Err(_) => format!("no answer within {limit:?}"),
                };
                outcome.failed.push((name.clone(), why));
                if let Some(kept) = last.get(&name) {
                    outcome.resolved.insert(&name, kept.to_vec());
                }
                continue;
            }
        };
        if addresses.iter().any(IpAddr::is_ipv4) {
            addresses.retain(IpAddr::is_ipv4);
        }
        addresses.sort();
        addresses.dedup();
        if addresses.len() > max {
            outcome.truncated.push((name.clone(), addresses.len()));
            let known = last.get(&name).unwrap_or_default();
            addresses.sort_by_key(|a| !known.contains(a));
            addresses.truncate(max);
            addresses.sort();
        }
        outcome.resolved.insert(&name, addresses);
    }
    outcome
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    #[derive(Debug)]
    struct Fixed(Mutex<std::io::Result<Vec<IpAddr>>>);

    impl Resolve for Fixed {
        fn resolve<'a>(
            &'a self,
            _host: &'a str,
        ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + 'a>> {
            let answer = match &*self.0.lock().unwrap() {
                Ok(a) => Ok(a.clone()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            };
            Box::pin(async move { answer })
        }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn config(max: usize) -> Config {
        let mut c = Config::parse(
            "[[routes]]\nmodels = [\"*\"]\nupstreams = [\"http://replicas.test:8000\", \
             \"http://10.0.0.9:8000\", \"http://[::1]:8000\"]\n",
        )
        .unwrap();
        c.upstream.dns_max_addresses = max;
        c
    }

    #[test]
    fn only_names_are_resolved() {
        assert_eq!(names(&config(4)), vec!["replicas.test".to_owned()]);
        assert!(!is_name("[::1]"));
        assert!(!is_name("10.0.0.1"));
        assert!(is_name("vllm-0.vllm.default.svc"));
    }

    #[tokio::test]
    async fn ipv4_is_preferred_capped_and_a_failure_keeps_the_last_set() {
        let limit = Duration::from_secs(1);
        let resolver = Fixed(Mutex::new(Ok(ips(&[
            "::1",
            "127.0.0.3",
            "127.0.0.1",
            "127.0.0.2",
        ]))));
        let first = resolve_all(&config(2), &resolver, &Resolved::default(), limit).await;
        assert_eq!(
            first.resolved.get("replicas.test").unwrap(),
            ips(&["127.0.0.1", "127.0.0.2"])
        );
        assert_eq!(first.truncated, vec![("replicas.test".to_owned(), 3)]);

        // Capped again: the addresses in use stay in, whatever their order.
        *resolver.0.lock().unwrap() = Ok(ips(&["127.0.0.0", "127.0.0.2", "127.0.0.1"]));
        let again = resolve_all(&config(2), &resolver, &first.resolved, limit).await;
        assert_eq!(
            again.resolved.get("replicas.test").unwrap(),
            ips(&["127.0.0.1", "127.0.0.2"])
        );

        *resolver.0.lock().unwrap() = Err(std::io::Error::other("SERVFAIL"));
        let failed = resolve_all(&config(2), &resolver, &first.resolved, limit).await;
        assert_eq!(failed.resolved, first.resolved);
        assert_eq!(failed.failed.len(), 1);
        assert!(failed.failed[0].1.contains("SERVFAIL"));

        *resolver.0.lock().unwrap() = Ok(Vec::new());
        let empty = resolve_all(&config(2), &resolver, &Resolved::default(), limit).await;
        assert_eq!(empty.resolved, Resolved::default());
        assert_eq!(empty.failed[0].1, "no address");

        *resolver.0.lock().unwrap() = Ok(ips(&["::2", "::1"]));
        let v6 = resolve_all(&config(4), &resolver, &Resolved::default(), limit).await;
        assert_eq!(
            v6.resolved.get("replicas.test").unwrap(),
            ips(&["::1", "::2"])
        );
    }
}
