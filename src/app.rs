//! The application's wiring: bind the listeners, build telemetry, tracing and the proxy, run
//! the accept loops and background tasks, and drain on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::{self, Config, secs};
use crate::proxy::Proxy;
use crate::telemetry::{ConnMetrics, Telemetry, otel, otlp_metrics};
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
    // Spans name one upstream as the server: `upstream.url`, or the first route's first.
    let url = config
        .routes
        .first()
        .and_then(|r| r.upstreams.first())
        .unwrap_or(&config.upstream.url);
    let upstream: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| proxy::BuildError::Url(e.to_string()))?;
    if let Some(otlp) = otlp_metrics::OtlpMetrics::new(config, telemetry, &upstream)? {
        telemetry.set_otlp_metrics(otlp);
    }
    Ok(otel::Tracer::new(&config.tracing, telemetry, &upstream)?.map(Arc::new))
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

/// Binds the listeners of a validated configuration and serves in the background.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let ready = Ready::prepare(config).await?;
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

/// Runs `tokentap serve` until `shutdown` resolves, then drains and returns.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let ready = Ready::prepare(config).await?;
    let upstreams: Vec<&str> = ready
        .proxy
        .routes()
        .endpoints()
        .iter()
        .map(|e| e.address())
        .collect();
    tracing::info!(
        listen = %ready.addr,
        admin = ?ready.admin_addr,
        upstreams = ?upstreams,
        routes = ready.proxy.routes().routes().len(),
        workers = tokio::runtime::Handle::current().metrics().num_workers(),
        "tokentap serving"
    );
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
}

impl Ready {
    /// Validates the configuration, binds both listeners and builds the proxy.
    async fn prepare(config: Config) -> Result<Ready, StartError> {
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
        let proxy = Arc::new(Proxy::new(&config, telemetry.clone(), tracer.clone())?);
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
        ..
    } = ready;
    let grace = secs(config.proxy.shutdown_grace_secs);
    let (admin_stop, admin_stopped) = oneshot::channel::<()>();
    let admin_task = admin.map(|listener| {
        let telemetry = telemetry.clone();
        let proxy = proxy.clone();
        let handler = move |req: Request<server::ClientBody>, _remote| {
            let live = || proxy.routes().any_live(tokio::time::Instant::now());
            let response = admin::handle(&telemetry, &req, live);
            async move { response.map(|b| b.map_err(|never| match never {}).boxed()) }
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
