//! Routes: which endpoints serve a request's model, and the pick of one of them for each
//! request, with one retry elsewhere when a connection is refused before anything was sent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, Uri};
use smallvec::SmallVec;
use tokio::time::Instant;

use super::balance::{Policy, Rng};
use super::dns::{self, Resolved};
use super::endpoint::{self, Endpoint, Pinned, Settings, UpstreamResponse};
use crate::config::{ANY_MODEL, Config, RouteConfig, secs};
use crate::http1::client::{RequestBody, SendError};
use crate::net::Connectors;
use crate::telemetry::Telemetry;

/// One route: its endpoints and how it balances over them.
#[derive(Debug)]
pub struct Route {
    /// The first model the route names (`"*"` for the catch-all): the `route` label.
    name: Box<str>,
    endpoints: Vec<Arc<Endpoint>>,
    policy: Policy,
    rng: Rng,
    live: metrics::Gauge,
    header_timeout: Duration,
    idle_timeout: Duration,
}

/// A request that no endpoint answered.
#[derive(Debug)]
pub struct Failed {
    /// Why (of the last endpoint tried).
    pub error: SendError,
    /// The last endpoint tried.
    pub endpoint: Arc<Endpoint>,
}

impl Route {
    /// The route's name (its first model).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its endpoints.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Limit on waiting for an endpoint's response head.
    pub fn header_timeout(&self) -> Duration {
        self.header_timeout
    }

    /// Limit on the silence between two body frames of a response.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// Picks an endpoint at `now` other than `except`: by the route's policy among the live
    /// ones; when none is live, the one whose ejection ends first (a route whose endpoints are
    /// all ejected still tries one rather than fail outright, as Envoy's panic threshold does).
    fn pick(&self, now: Instant, except: Option<&Arc<Endpoint>>) -> Option<&Arc<Endpoint>> {
        let candidate = |e: &&Arc<Endpoint>| except.is_none_or(|x| !Arc::ptr_eq(x, e));
        let live: SmallVec<[&Arc<Endpoint>; 8]> = self
            .endpoints
            .iter()
            .filter(candidate)
            .filter(|e| e.health().is_live(now))
            .collect();
        if live.is_empty() {
            return self
                .endpoints
                .iter()
                .filter(candidate)
                .min_by_key(|e| e.health().ejected_until(now));
        }
        let i = self
            .policy
            .pick(live.len(), &self.rng, now, |i| live[i].load());
        Some(live[i])
    }

    /// Sends `req` to an endpoint of the route. When the connection is refused before any of
    /// the request was written and `retry` allows (its body is held whole, or empty), it is
    /// sent once more, to another endpoint.
    pub async fn send(
        &self,
        req: Request<RequestBody>,
        retry: bool,
    ) -> Result<(Response<UpstreamResponse>, Arc<Endpoint>), Failed> {
        let sent = self.try_endpoints(req, retry).await;
        self.count_live(Instant::now());
        sent
    }

    /// Sets the live-endpoints gauge (after each request, as its answer may have ejected or
    /// recovered an endpoint; and periodically, as ejections end by themselves).
    fn count_live(&self, now: Instant) {
        let live = self
            .endpoints
            .iter()
            .filter(|e| e.health().is_live(now))
            .count();
        self.live.set(live as f64);
    }

    async fn try_endpoints(
        &self,
        req: Request<RequestBody>,
        retry: bool,
    ) -> Result<(Response<UpstreamResponse>, Arc<Endpoint>), Failed> {
        let now = Instant::now();
        let first = self.pick(now, None).expect("a route has endpoints").clone();
        let refused = match first.send(req).await {
            Ok(response) => return Ok((response, first)),
            Err(refused) => refused,
        };
        let second = match (&refused.error, refused.request) {
            (SendError::Connect(_), Some(req)) if retry => self
                .pick(Instant::now(), Some(&first))
                .cloned()
                .map(|e| (e, req)),
            _ => None,
        };
        let Some((second, req)) = second else {
            return Err(Failed {
                error: refused.error,
                endpoint: first,
            });
        };
        first.retried_elsewhere();
        tracing::debug!(
            from = first.address(),
            to = second.address(),
            "connection refused, request sent to another upstream"
        );
        match second.send(req).await {
            Ok(response) => Ok((response, second)),
            Err(refused) => Err(Failed {
                error: refused.error,
                endpoint: second,
            }),
        }
    }

    /// Whether the route balances on latency, which its endpoints then learn from requests.
    pub fn estimates_latency(&self) -> bool {
        matches!(self.policy, Policy::PeakEwma)
    }

    /// Whether an endpoint is live at `now`.
    pub fn any_live(&self, now: Instant) -> bool {
        self.endpoints.iter().any(|e| e.health().is_live(now))
    }
}

/// Every route, and the model → route table.
#[derive(Debug)]
pub struct Routes {
    routes: Vec<Route>,
    by_model: HashMap<Box<str>, usize>,
    /// The route of requests without a usable model: the `"*"` route, else the first.
    fallback: usize,
    /// A `"*"` route exists: no model is unknown.
    catch_all: bool,
    /// Every endpoint once, in the order the configuration first names them.
    endpoints: Vec<Arc<Endpoint>>,
    /// The addresses of the DNS names the endpoints stand for.
    resolved: Resolved,
    /// What the endpoints' connectors were made with (a DNS change builds new endpoints
    /// with them).
    connectors: Connectors,
}

impl Routes {
    /// The routes of a validated configuration: its `[[routes]]`, or one catch-all route to
    /// `upstream.url`. An upstream named in several routes is one endpoint; one whose host is a
    /// name in `resolved` is one endpoint per address. With `previous` (a reload, or new DNS
    /// answers), an endpoint whose address and settings are unchanged is the previous one, with
    /// its pool, load, latency estimate and health; the rest are new.
    pub fn new(
        config: &Config,
        connectors: &Connectors,
        telemetry: &Telemetry,
        previous: Option<&Routes>,
        resolved: Resolved,
    ) -> Result<Routes, String> {
        let short = [RouteConfig {
            models: vec![ANY_MODEL.to_owned()],
            upstreams: vec![config.upstream.url.clone()],
            balance: crate::config::Balance::RoundRobin,
            ..RouteConfig::default()
        }];
        let configured: &[RouteConfig] = if config.routes.is_empty() {
            &short
        } else {
            &config.routes
        };
        let old: &[Arc<Endpoint>] = previous.map_or(&[], |p| &p.endpoints);
        let base_connectors = connectors.clone();
        let mut endpoints: Vec<Arc<Endpoint>> = Vec::new();
        let mut routes = Vec::with_capacity(configured.len());
        let mut by_model = HashMap::new();
        let (mut fallback, mut catch_all) = (0, false);
        for (i, rc) in configured.iter().enumerate() {
            // `[upstream]`'s settings, with the route's own where it sets them: a route with
            // other connection settings has endpoints of its own.
            let up = rc.effective(&config.upstream);
            let connectors = match rc.connect_timeout_secs.map(secs) {
                Some(t) if t != connectors.connect_timeout() => &connectors.with_timeout(t),
                _ => connectors,
            };
            let settings = Settings {
                connect_timeout: connectors.connect_timeout(),
                ca_digest: connectors.ca_digest(),
                max_idle: up.pool_max_idle,
                idle_timeout: secs(up.pool_idle_timeout_secs),
            };
            let mut mine = Vec::with_capacity(rc.upstreams.len());
            for url in &rc.upstreams {
                let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
                let base = base(&uri);
                let host = uri.host().unwrap_or_default();
                let ips: Vec<Option<std::net::IpAddr>> = match resolved.get(host) {
                    Some(ips) if dns::is_name(host) && !ips.is_empty() => {
                        ips.iter().copied().map(Some).collect()
                    }
                    _ => vec![None],
                };
                // Slots of this name's endpoints that stay (kept, or built for another
                // route already): a new address takes the lowest free one.
                let mut taken: Vec<usize> = endpoints
                    .iter()
                    .chain(old.iter().filter(|e| *e.settings() == settings))
                    .filter(|e| e.base() == base)
                    .filter_map(|e| e.pinned())
                    .filter(|p| ips.contains(&Some(p.ip)))
                    .map(|p| p.slot)
                    .collect();
                for ip in ips {
                    let same = |e: &&Arc<Endpoint>| {
                        e.base() == base
                            && *e.settings() == settings
                            && e.pinned().map(|p| p.ip) == ip
                    };
                    if let Some(known) = endpoints.iter().find(same) {
                        mine.push(known.clone());
                        continue;
                    }
                    let endpoint = match old.iter().find(same) {
                        Some(kept) => kept.clone(),
                        None => {
                            let pinned = ip.map(|ip| {
                                let slot = (0..).find(|s| !taken.contains(s)).unwrap_or(0);
                                taken.push(slot);
                                Pinned { ip, slot }
                            });
                            let connector = match pinned {
                                Some(p) => connectors.pinned(p.ip),
                                None => connectors.system(),
                            };
                            let metrics =
                                telemetry.upstream_endpoint(&endpoint::label(&base, pinned));
                            Arc::new(Endpoint::new(
                                &uri,
                                pinned,
                                connector,
                                settings.clone(),
                                metrics,
                            )?)
                        }
                    };
                    endpoints.push(endpoint.clone());
                    mine.push(endpoint);
                }
            }
            for model in &rc.models {
                if model == ANY_MODEL {
                    (fallback, catch_all) = (i, true);
                } else {
                    by_model.insert(model.as_str().into(), i);
                }
            }
            let name: Box<str> = rc.models[0].as_str().into();
            let live = telemetry.route_live(&name);
            let now = Instant::now();
            live.set(mine.iter().filter(|e| e.health().is_live(now)).count() as f64);
            routes.push(Route {
                name,
                endpoints: mine,
                policy: Policy::new(rc.balance),
                rng: Rng::new(rand::random::<u64>() ^ i as u64),
                live,
                header_timeout: secs(up.response_header_timeout_secs),
                idle_timeout: secs(up.idle_timeout_secs),
            });
        }
        Ok(Routes {
            routes,
            by_model,
            fallback,
            catch_all,
            endpoints,
            resolved,
            connectors: base_connectors,
        })
    }

    /// The addresses of the DNS names the endpoints stand for.
    pub fn resolved(&self) -> &Resolved {
        &self.resolved
    }

    /// What the endpoints' connectors were made with.
    pub fn connectors(&self) -> &Connectors {
        &self.connectors
    }

    /// After `self` replaced `previous`: zeroes the gauges of the routes and endpoints that are
    /// gone, so a scrape does not show them live or ejected (their label values stay exported,
    /// bounded by the configurations loaded since start).
    pub fn retire(&self, previous: &Routes) {
        for old in &previous.routes {
            if !self.routes.iter().any(|r| r.name == old.name) {
                old.live.set(0.0);
            }
        }
        for old in &previous.endpoints {
            if !self.endpoints.iter().any(|e| Arc::ptr_eq(e, old)) {
                old.retire();
            }
        }
    }

    /// How many of the endpoints are `previous`'s (kept across a reload with their state).
    pub fn kept_from(&self, previous: &Routes) -> usize {
        self.endpoints
            .iter()
            .filter(|e| previous.endpoints.iter().any(|p| Arc::ptr_eq(e, p)))
            .count()
    }

    /// Whether requests are routed by model at all (some route names a model): only then need
    /// bodies be read for it.
    pub fn by_model(&self) -> bool {
        !self.by_model.is_empty()
    }

    /// The route for a request whose body names `model` (`None`: no usable model, or the body
    /// was not read); `None` when the model is named and no route serves it.
    pub fn route(&self, model: Option<&str>) -> Option<&Route> {
        match model.filter(|m| !m.is_empty()) {
            Some(m) => match self.by_model.get(m) {
                Some(&i) => Some(&self.routes[i]),
                None if self.catch_all => Some(&self.routes[self.fallback]),
                None => None,
            },
            None => Some(&self.routes[self.fallback]),
        }
    }

    /// Every route.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Every endpoint once.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// The model names routes name (not `"*"`).
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.by_model.keys().map(|m| &**m)
    }

    /// Whether some route has a live endpoint at `now` (readiness: one model's outage does not
    /// take the whole proxy out of its Service).
    pub fn any_live(&self, now: Instant) -> bool {
        self.routes.iter().any(|r| r.any_live(now))
    }

    /// Periodic upkeep: closes expired idle connections and brings the health gauges up to
    /// date (an ejection ends by itself).
    pub fn upkeep(&self, now: Instant) {
        for endpoint in &self.endpoints {
            endpoint.pool().sweep();
            endpoint.refresh(now);
        }
        for route in &self.routes {
            route.count_live(now);
        }
    }
}

/// `scheme://authority` of an upstream URL.
fn base(uri: &Uri) -> String {
    match (uri.scheme(), uri.authority()) {
        (Some(s), Some(a)) => format!("{s}://{a}"),
        _ => uri.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::Routes;
    use crate::config::Config;
    use crate::telemetry::Telemetry;

    fn config(text: &str) -> Config {
        Config::parse(text).unwrap()
    }

    fn find(routes: &Routes, address: &str) -> Arc<super::Endpoint> {
        routes
            .endpoints()
            .iter()
            .find(|e| e.address() == address)
            .unwrap()
            .clone()
    }

    #[tokio::test]
    async fn a_reload_keeps_the_endpoints_whose_address_and_settings_are_unchanged() {
        let first = config(
            "[[routes]]\nmodels = [\"a\"]\nupstreams = [\"http://127.0.0.1:1\", \"http://127.0.0.1:2\"]\n\
             [[routes]]\nmodels = [\"*\"]\nupstreams = [\"http://127.0.0.1:2\"]\n",
        );
        let telemetry = Telemetry::new(&first);
        let connector =
            crate::net::Connectors::new(std::time::Duration::from_secs(1), None).unwrap();
        let none = super::Resolved::default;
        let old = Routes::new(&first, &connector, &telemetry, None, none()).unwrap();
        // The state a reload must not lose: an outstanding request, an ejection.
        let one = find(&old, "http://127.0.0.1:1");
        one.load().start();
        let now = tokio::time::Instant::now();
        for _ in 0..10 {
            one.health().on_connect_error(now);
        }
        assert!(!one.health().is_live(now));

        let second = config(
            "[[routes]]\nmodels = [\"*\"]\nupstreams = [\"http://127.0.0.1:3\", \"http://127.0.0.1:1\"]\n",
        );
        let new = Routes::new(&second, &connector, &telemetry, Some(&old), none()).unwrap();
        assert!(Arc::ptr_eq(&find(&new, "http://127.0.0.1:1"), &one));
        assert!(!find(&new, "http://127.0.0.1:1").health().is_live(now));
        assert_eq!(new.kept_from(&old), 1);
        assert_eq!(new.endpoints().len(), 2);
        assert_eq!(new.routes().len(), 1);

        // Other pool settings: a new endpoint at the same address, with a fresh state.
        let third = config(
            "[upstream]\npool_max_idle = 3\n[[routes]]\nmodels = [\"*\"]\nupstreams = [\"http://127.0.0.1:1\"]\n",
        );
        let newer = Routes::new(&third, &connector, &telemetry, Some(&new), none()).unwrap();
        let fresh = find(&newer, "http://127.0.0.1:1");
        assert!(!Arc::ptr_eq(&fresh, &one));
        assert!(fresh.health().is_live(now));
        assert_eq!(newer.kept_from(&new), 0);
        one.load().end();
    }

    /// A CA certificate rotated in place (same `ca_file` path, other certificates) is a change:
    /// the reload builds the endpoints afresh, so new connections trust the new CA. The same
    /// certificates written again are no change.
    #[tokio::test]
    async fn a_reload_rebuilds_the_endpoints_whose_ca_certificates_changed() {
        let ca = || {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .self_signed(&rcgen::KeyPair::generate().unwrap())
                .unwrap()
                .pem()
        };
        let dir = std::env::temp_dir().join(format!("tokentap-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ca.pem");
        let text = format!(
            "[upstream]\nca_file = {:?}\n[[routes]]\nmodels = [\"*\"]\nupstreams = [\"https://127.0.0.1:1\"]\n",
            file.display().to_string()
        );
        let (first, second) = (ca(), ca());
        std::fs::write(&file, &first).unwrap();
        let c = config(&text);
        let telemetry = Telemetry::new(&c);
        let timeout = std::time::Duration::from_secs(1);
        let build = |previous: Option<&Routes>| {
            let connectors = crate::net::Connectors::new(timeout, Some(&file)).unwrap();
            Routes::new(
                &c,
                &connectors,
                &telemetry,
                previous,
                super::Resolved::default(),
            )
            .unwrap()
        };
        let old = build(None);
        std::fs::write(&file, &first).unwrap();
        let same = build(Some(&old));
        assert_eq!(same.kept_from(&old), 1, "the same certificates: kept");
        std::fs::write(&file, &second).unwrap();
        let rotated = build(Some(&same));
        assert_eq!(
            rotated.kept_from(&same),
            0,
            "a rotated certificate: rebuilt"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_route_overrides_the_upstream_settings_for_itself_only() {
        let c = config(
            "[upstream]
idle_timeout_secs = 50
             [[routes]]
models = [\"a\"]
upstreams = [\"http://127.0.0.1:1\"]
             response_header_timeout_secs = 2
idle_timeout_secs = 3
pool_max_idle = 0
             [[routes]]
models = [\"*\"]
upstreams = [\"http://127.0.0.1:1\"]
",
        );
        let telemetry = Telemetry::new(&c);
        let connector =
            crate::net::Connectors::new(std::time::Duration::from_secs(1), None).unwrap();
        let routes =
            Routes::new(&c, &connector, &telemetry, None, super::Resolved::default()).unwrap();
        let (a, any) = (
            routes.route(Some("a")).unwrap(),
            routes.route(None).unwrap(),
        );
        assert_eq!(a.header_timeout(), std::time::Duration::from_secs(2));
        assert_eq!(a.idle_timeout(), std::time::Duration::from_secs(3));
        assert_eq!(any.header_timeout(), std::time::Duration::from_secs(600));
        assert_eq!(any.idle_timeout(), std::time::Duration::from_secs(50));
        // Other pool settings: the same address is an endpoint of each route's own.
        assert_eq!(routes.endpoints().len(), 2);
        assert_eq!(a.endpoints()[0].settings().max_idle, 0);
        assert_eq!(any.endpoints()[0].settings().max_idle, 1024);
    }
}
