//! The application's wiring: bind the listeners, build telemetry, tracing and the proxy, run
//! the accept loops and background tasks, and drain on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::{self, Config, secs};
use crate::proxy::Proxy;
use crate::telemetry::{ConnMetrics, ReloadMetrics, Telemetry, otel, otlp_metrics};
use crate::upstream::dns::{self, Resolve, Resolved, SystemResolver};
use crate::{admin, proxy, server};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is not usable.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The upstream client could not be built.
    #[error(transparent)]
    Build(#[from] proxy::BuildError),
    /// The span exporter could not be set up.
    #[error(transparent)]
    Tracing(#[from] otel::TracingError),
    /// The OTLP metric exporter could not be set up.
    #[error(transparent)]
    OtlpMetrics(#[from] otlp_metrics::OtlpMetricsError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A proxy running in the background, started by [`start`].
#[derive(Debug)]
pub struct Running {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    telemetry: Arc<Telemetry>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

fn build_tracer(
    config: &Config,
    telemetry: &Telemetry,
) -> Result<Option<Arc<otel::Tracer>>, StartError> {
    if let Some(otlp) = otlp_metrics::OtlpMetrics::new(config, telemetry)? {
        telemetry.set_otlp_metrics(otlp);
    }
    Ok(otel::Tracer::new(&config.tracing, telemetry)?.map(Arc::new))
}

impl Running {
    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the admin listener is, if it is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The metrics registry (tests read it directly).
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// Stops accepting, drains within the grace period, and returns when everything has stopped.
    /// A panic inside the server is raised again here.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Err(error) = (&mut self.task).await
            && error.is_panic()
        {
            std::panic::resume_unwind(error.into_panic());
        }
    }
}

/// Binds the listeners of a validated configuration and serves in the background. Without a
/// file to re-read, a reload (`POST /-/reload`) is refused.
pub async fn start(config: Config) -> Result<Running, StartError> {
    start_ready(Ready::prepare(config, Arc::new(SystemResolver)).await?)
}

/// Loads the configuration of `source`, binds its listeners and serves in the background;
/// `POST /-/reload` on the admin listener re-reads `source`.
pub async fn start_from(source: config::Source) -> Result<Running, StartError> {
    start_with(source, Arc::new(SystemResolver)).await
}

/// [`start_from`], with upstream DNS names resolved by `resolver` (tests hand out address
/// sets of their own).
pub async fn start_with(
    source: config::Source,
    resolver: Arc<dyn Resolve>,
) -> Result<Running, StartError> {
    let mut ready = Ready::prepare(source.load()?, resolver).await?;
    ready.source = Some(source);
    start_ready(ready)
}

fn start_ready(ready: Ready) -> Result<Running, StartError> {
    let (addr, admin_addr, telemetry) = (ready.addr, ready.admin_addr, ready.telemetry.clone());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(ready, async {
        let _ = stopped.await;
    }));
    Ok(Running {
        addr,
        admin_addr,
        telemetry,
        stop: Some(stop),
        task,
    })
}

/// Runs `tokentap serve` until `shutdown` resolves, then drains and returns. Without a file to
/// re-read, a reload is refused.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    run_ready(
        Ready::prepare(config, Arc::new(SystemResolver)).await?,
        shutdown,
    )
    .await
}

/// Runs `tokentap serve` on `config`, loaded from `source`, until `shutdown` resolves, then
/// drains and returns. SIGHUP and `POST /-/reload` re-read `source`; the SIGHUP handler is in
/// place before the "tokentap serving" line is logged.
pub async fn run_from(
    config: Config,
    source: config::Source,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let mut ready = Ready::prepare(config, Arc::new(SystemResolver)).await?;
    ready.source = Some(source);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        ready.hangup = signal(SignalKind::hangup())
            .inspect_err(
                |error| tracing::warn!(%error, "no SIGHUP handler: reload with POST /-/reload"),
            )
            .ok();
    }
    run_ready(ready, shutdown).await
}

async fn run_ready(
    ready: Ready,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let routes = ready.proxy.routes();
    let upstreams: Vec<&str> = routes.endpoints().iter().map(|e| e.address()).collect();
    tracing::info!(
        listen = %ready.addr,
        admin = ?ready.admin_addr,
        upstreams = ?upstreams,
        routes = routes.routes().len(),
        workers = tokio::runtime::Handle::current().metrics().num_workers(),
        "tokentap serving"
    );
    drop(upstreams);
    drop(routes);
    serve(ready, shutdown).await;
    Ok(())
}

/// Builds the runtime every `tokentap` command runs on, before anything starts: `workers`
/// threads, or when `None` one per CPU the process may run on (`TOKIO_WORKER_THREADS` if set,
/// else what `taskset` and cgroup CPU limits allow). One worker gets tokio's single-threaded
/// scheduler: with no thread to hand work to, work stealing only costs instructions on every
/// poll; more get the work-stealing one.
pub fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let workers = workers.or_else(workers_from_env).unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let mut builder = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder.enable_all().build()
}

/// `TOKIO_WORKER_THREADS` when it is a positive number; anything else is ignored.
fn workers_from_env() -> Option<usize> {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&n| n > 0)
}

/// Everything `serve` needs: bound listeners and the shared state, built once.
struct Ready {
    config: Config,
    listener: TcpListener,
    admin: Option<TcpListener>,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    telemetry: Arc<Telemetry>,
    tracer: Option<Arc<otel::Tracer>>,
    proxy: Arc<Proxy>,
    limits: server::Limits,
    /// The file a reload re-reads, with the command-line settings over it.
    source: Option<config::Source>,
    /// Resolves the upstreams' DNS names.
    resolver: Arc<dyn Resolve>,
    /// SIGHUP, when `run_from` installed its handler.
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
}

impl Ready {
    /// Validates the configuration, binds both listeners and builds the proxy.
    async fn prepare(config: Config, resolver: Arc<dyn Resolve>) -> Result<Ready, StartError> {
        config.validate()?;
        let listener = bind(config.listen).await?;
        let admin = match config.admin_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
        let telemetry = Arc::new(Telemetry::new(&config));
        let tracer = build_tracer(&config, &telemetry)?;
        let resolved = resolve(&config, &*resolver, &Resolved::default(), &telemetry).await;
        let proxy = Arc::new(Proxy::new(
            &config,
            telemetry.clone(),
            tracer.clone(),
            resolved,
        )?);
        // The models routes name are `model` label values from the start.
        telemetry.models.extend(proxy.routes().models());
        let limits = server::Limits::of(&config, raise_fd_limit());
        Ok(Ready {
            config,
            listener,
            admin,
            addr,
            admin_addr,
            telemetry,
            tracer,
            proxy,
            limits,
            source: None,
            resolver,
            #[cfg(unix)]
            hangup: None,
        })
    }
}

/// Raises the process's soft open-file limit to its hard limit (a proxy needs two descriptors
/// per stream, and the usual soft default of 1,024 would lock clients out long before memory or
/// CPU run short); returns the soft limit in force.
fn raise_fd_limit() -> Option<u64> {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).ok()?;
    match rlimit::increase_nofile_limit(hard) {
        Ok(now) if now > soft => {
            tracing::debug!(from = soft, to = now, "raised the open-file limit");
            Some(now)
        }
        Ok(now) => Some(now),
        Err(error) => {
            tracing::warn!(%error, limit = soft, "could not raise the open-file limit");
            Some(soft)
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// Serves until `shutdown` resolves, then stops the background tasks, drains the admin
/// listener and flushes spans.
async fn serve(ready: Ready, shutdown: impl Future<Output = ()> + Send + 'static) {
    let Ready {
        config,
        proxy,
        telemetry,
        tracer,
        listener,
        admin,
        limits,
        source,
        resolver,
        #[cfg(unix)]
        hangup,
        ..
    } = ready;
    let grace = secs(config.proxy.shutdown_grace_secs);
    let reloader = Arc::new(Reloader::new(
        source,
        config.clone(),
        proxy.clone(),
        telemetry.clone(),
        resolver,
    ));
    let dns_refresh = tokio::spawn({
        let reloader = reloader.clone();
        let mut every = secs(config.upstream.dns_refresh_secs);
        async move {
            loop {
                tokio::time::sleep(every).await;
                every = reloader.refresh_dns().await;
            }
        }
    });
    #[cfg(unix)]
    let hangup_task = hangup.map(|mut hangup| {
        let reloader = reloader.clone();
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                let _ = reloader.reload("SIGHUP").await;
            }
        })
    });
    let (admin_stop, admin_stopped) = oneshot::channel::<()>();
    let admin_task = admin.map(|listener| {
        let telemetry = telemetry.clone();
        let proxy = proxy.clone();
        let reloader = reloader.clone();
        let handler = move |req: Request<server::ClientBody>, _remote| {
            let reload = (req.uri().path() == RELOAD_PATH).then(|| req.method().clone());
            let response = reload.is_none().then(|| {
                let live = || proxy.routes().any_live(tokio::time::Instant::now());
                admin::handle(&telemetry, &req, live)
            });
            let reloader = reloader.clone();
            async move {
                let response = match (response, reload) {
                    (Some(response), _) => response,
                    (None, method) => reload_answer(reloader, method).await,
                };
                response.map(|b| b.map_err(|never| match never {}).boxed())
            }
        };
        tokio::spawn(server::serve(
            listener,
            handler,
            async {
                let _ = admin_stopped.await;
            },
            Duration::from_secs(1),
            "admin",
            server::Limits::default(),
            ConnMetrics::noop(),
        ))
    });
    let upkeep = tokio::spawn({
        let telemetry = telemetry.clone();
        let proxy = proxy.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                telemetry.run_upkeep();
                proxy.routes().upkeep(tokio::time::Instant::now());
            }
        }
    });
    let poller = tokio::spawn(poll_upstream(
        proxy.clone(),
        telemetry.clone(),
        config.telemetry.discover_models,
        secs(config.telemetry.model_refresh_secs),
    ));
    let handler = move |req, remote| proxy.clone().handle(req, remote);
    let connections = telemetry.connections();
    server::serve(
        listener,
        handler,
        shutdown,
        grace,
        "proxy",
        limits,
        connections,
    )
    .await;
    poller.abort();
    upkeep.abort();
    dns_refresh.abort();
    #[cfg(unix)]
    if let Some(task) = hangup_task {
        task.abort();
    }
    if let Some(tracer) = tracer {
        tracer.shutdown().await;
    }
    if let Some(otlp) = telemetry.otlp_metrics() {
        otlp.shutdown().await;
    }
    let _ = admin_stop.send(());
    if let Some(task) = admin_task {
        let _ = task.await;
    }
}

/// The admin path that reloads the configuration (`POST`), as Prometheus's `/-/reload`.
pub const RELOAD_PATH: &str = "/-/reload";

/// `POST /-/reload`: 200 with a summary when the re-read configuration is in force, 500 with
/// the reason (naming the field) when it was refused and the running one stays.
async fn reload_answer(reloader: Arc<Reloader>, method: Option<Method>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header(header::ALLOW, "POST")
            .body(Full::new(Bytes::from(body + "\n")))
            .expect("static response parts are valid")
    };
    if method != Some(Method::POST) {
        return text(StatusCode::METHOD_NOT_ALLOWED, "POST only".to_owned());
    }
    match reloader.reload("admin").await {
        Ok(summary) => text(StatusCode::OK, summary),
        Err(reason) => text(StatusCode::INTERNAL_SERVER_ERROR, reason),
    }
}

/// Re-reads the configuration file and puts its `[upstream]` and `[[routes]]` in force for new
/// requests (SIGHUP, `POST /-/reload`), and resolves the upstreams' DNS names again
/// (`upstream.dns_refresh_secs`); counts and logs each try.
struct Reloader {
    source: Option<config::Source>,
    /// The configuration in force: the one started with, with the `[upstream]` and
    /// `[[routes]]` of the last successful reload. Held for the whole of a reload or a DNS
    /// refresh, so they run one at a time.
    current: tokio::sync::Mutex<Config>,
    proxy: Arc<Proxy>,
    telemetry: Arc<Telemetry>,
    metrics: ReloadMetrics,
    resolver: Arc<dyn Resolve>,
}

impl Reloader {
    fn new(
        source: Option<config::Source>,
        config: Config,
        proxy: Arc<Proxy>,
        telemetry: Arc<Telemetry>,
        resolver: Arc<dyn Resolve>,
    ) -> Reloader {
        let metrics = telemetry.config_reloads();
        metrics.last_ok.set(1.0);
        metrics.last_time.set(unix_now());
        Reloader {
            source,
            current: tokio::sync::Mutex::new(config),
            proxy,
            telemetry,
            metrics,
            resolver,
        }
    }

    /// One reload, asked for by `trigger`: the summary of the table now in force, or why the
    /// file was refused (the running configuration stays).
    async fn reload(&self, trigger: &'static str) -> Result<String, String> {
        let result = self.try_reload().await;
        match &result {
            Ok(summary) => {
                self.metrics.ok.increment(1);
                self.metrics.last_ok.set(1.0);
                self.metrics.last_time.set(unix_now());
                tracing::info!(trigger, "{summary}");
            }
            Err(reason) => {
                self.metrics.error.increment(1);
                self.metrics.last_ok.set(0.0);
                tracing::error!(
                    trigger,
                    error = %reason,
                    "configuration reload refused; the running configuration stays"
                );
            }
        }
        result
    }

    async fn try_reload(&self) -> Result<String, String> {
        let Some(source) = self.source.clone().filter(|s| s.path.is_some()) else {
            return Err("no configuration file to re-read: started without --config".to_owned());
        };
        let mut current = self.current.lock().await;
        // Reading the file and the CA certificates blocks.
        let (new, connectors) = tokio::task::spawn_blocking(move || {
            let new = source.load().map_err(|e| e.to_string())?;
            let connectors = proxy::connectors(&new).map_err(|e| e.to_string())?;
            Ok::<_, String>((new, connectors))
        })
        .await
        .map_err(|_| "the configuration file could not be read".to_owned())??;
        for section in restart_only(&current, &new) {
            tracing::warn!(
                section,
                "changed in the configuration file, but takes effect only at a restart; the \
                 running value is kept"
            );
        }
        let mut next = current.clone();
        next.upstream = new.upstream;
        next.routes = new.routes;
        let last = self.proxy.routes().resolved().clone();
        let resolved = resolve(&next, &*self.resolver, &last, &self.telemetry).await;
        let (previous, routes) = self
            .proxy
            .rebuild(&next, Some(connectors), resolved)
            .map_err(|e| e.to_string())?;
        self.telemetry.models.extend(routes.models());
        let names = dns::names(&next);
        for gone in dns::names(&current).iter().filter(|n| !names.contains(n)) {
            self.telemetry.dns_name(gone).addresses.set(0.0);
        }
        *current = next;
        Ok(format!(
            "configuration reloaded: {} routes, {} upstreams ({} kept with their connections \
             and health)",
            routes.routes().len(),
            routes.endpoints().len(),
            routes.kept_from(&previous),
        ))
    }

    /// Resolves the upstreams' DNS names again; a changed address set puts a new table in
    /// force, as a reload does, with the configuration in force. Returns when to refresh next.
    async fn refresh_dns(&self) -> Duration {
        let current = self.current.lock().await;
        let every = secs(current.upstream.dns_refresh_secs);
        if dns::names(&current).is_empty() {
            return every;
        }
        let last = self.proxy.routes().resolved().clone();
        let resolved = resolve(&current, &*self.resolver, &last, &self.telemetry).await;
        if resolved == last {
            return every;
        }
        match self.proxy.rebuild(&current, None, resolved) {
            Ok((previous, routes)) => tracing::info!(
                upstreams = routes.endpoints().len(),
                kept = routes.kept_from(&previous),
                "upstream DNS names resolved to other addresses; new requests use them"
            ),
            Err(error) => tracing::warn!(%error, "upstream addresses changed but were not used"),
        }
        every
    }
}

/// Longest wait for one DNS name's addresses.
const DNS_LIMIT: Duration = Duration::from_secs(5);

/// Resolves the upstream DNS names of `config` (see [`dns::resolve_all`]), counting and
/// logging the names that did not resolve or had more addresses than the cap.
async fn resolve(
    config: &Config,
    resolver: &dyn Resolve,
    last: &Resolved,
    telemetry: &Telemetry,
) -> Resolved {
    let outcome = dns::resolve_all(config, resolver, last, DNS_LIMIT).await;
    for (name, error) in &outcome.failed {
        telemetry.dns_name(name).failures.increment(1);
        let kept = outcome.resolved.get(name).map_or(0, <[_]>::len);
        tracing::warn!(
            name,
            %error,
            kept,
            "upstream DNS name gave no address; its last addresses stay in use (none: it is \
             resolved at each connection)"
        );
    }
    for (name, found) in &outcome.truncated {
        telemetry.dns_name(name).truncated.increment(1);
        tracing::warn!(
            name,
            found,
            max = config.upstream.dns_max_addresses,
            "upstream DNS name has more addresses than upstream.dns_max_addresses; the rest are \
             left out"
        );
    }
    for name in dns::names(config) {
        let n = outcome.resolved.get(&name).map_or(0, <[_]>::len);
        telemetry.dns_name(&name).addresses.set(n as f64);
    }
    outcome.resolved
}

/// The top-level sections of the configuration that a reload cannot change (listeners,
/// limits and telemetry are set up once at start) and that differ between `old` and `new`.
fn restart_only(old: &Config, new: &Config) -> Vec<&'static str> {
    let changed = [
        ("listen", old.listen != new.listen),
        ("admin_listen", old.admin_listen != new.admin_listen),
        ("workers", old.workers != new.workers),
        ("proxy", old.proxy != new.proxy),
        ("telemetry", old.telemetry != new.telemetry),
        ("slo", old.slo != new.slo),
        ("tracing", old.tracing != new.tracing),
        ("otlp_metrics", old.otlp_metrics != new.otlp_metrics),
    ];
    changed
        .into_iter()
        .filter_map(|(section, changed)| changed.then_some(section))
        .collect()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Polls every upstream endpoint's `GET /v1/models`: an answer keeps `/readyz` current and
/// the endpoint's passive health too (a refused poll ejects it, an answer lets it back), and,
/// when `discover` is on, adds the listed model names to the allowed `model` label values.
async fn poll_upstream(
    proxy: Arc<Proxy>,
    telemetry: Arc<Telemetry>,
    discover: bool,
    every: Duration,
) {
    #[derive(serde::Deserialize)]
    struct Models {
        data: Vec<Model>,
    }
    #[derive(serde::Deserialize)]
    struct Model {
        id: String,
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for endpoint in proxy.routes().endpoints() {
            let answer = tokio::time::timeout(Duration::from_secs(10), async {
                let response = endpoint.get("/v1/models").await.ok()?;
                let status = response.status();
                let body = http_body_util::Limited::new(response.into_body(), 4 * 1024 * 1024)
                    .collect()
                    .await
                    .ok()?
                    .to_bytes();
                Some((status, body))
            })
            .await;
            match answer {
                Ok(Some((status, body))) if status.as_u16() < 500 => {
                    telemetry.upstream.mark();
                    if discover && status.is_success() {
                        match serde_json::from_slice::<Models>(&body) {
                            Ok(models) => telemetry
                                .models
                                .extend(models.data.iter().map(|m| m.id.as_str())),
                            Err(error) => {
                                tracing::debug!(%error, "upstream /v1/models is not a model list")
                            }
                        }
                    }
                }
                Ok(Some((status, _))) => tracing::warn!(
                    upstream = endpoint.address(),
                    %status,
                    "upstream /v1/models failed"
                ),
                _ => tracing::debug!(
                    upstream = endpoint.address(),
                    "upstream /v1/models did not answer"
                ),
            }
        }
    }
}

/// Resolves when the process receives SIGINT (Ctrl-C) or SIGTERM. The handlers are installed
/// when this is called (inside a runtime), so a signal that arrives before the future is first
/// polled is not lost.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).ok();
        let mut int = signal(SignalKind::interrupt()).ok();
        async move {
            tokio::select! {
                () = recv(term.as_mut()) => {},
                () = recv(int.as_mut()) => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(unix)]
async fn recv(signal: Option<&mut tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

#[cfg(test)]
mod tests {
    use tokio::runtime::RuntimeFlavor;

    #[test]
    fn one_worker_runs_the_single_threaded_scheduler() {
        let rt = super::runtime(Some(1)).unwrap();
        assert_eq!(rt.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
        assert_eq!(rt.metrics().num_workers(), 1);
        // Timers and sockets work on it: enable_all.
        let slept = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            listener.local_addr().is_ok()
        });
        assert!(slept);
    }

    #[test]
    fn more_workers_run_the_work_stealing_scheduler() {
        let rt = super::runtime(Some(3)).unwrap();
        assert_eq!(rt.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        assert_eq!(rt.metrics().num_workers(), 3);
    }
}
