//! A vLLM-like OpenAI-compatible server with no model and no GPU, for demos, tests and load
//! tests: realistic SSE shapes (`/v1/chat/completions`, `/v1/completions`), a timing model
//! (queueing, prefill, decode steps that slow down with concurrency), determinism under a
//! seed, and fault injection (`x-tokentap-sim-fault` header or `[faults]` rates).
//!
//! Streams are driven by timers inside the response body (`http_body::Body::poll_frame`):
//! no task or channel per stream, so thousands of concurrent streams cost little. A stream
//! whose body is dropped before its end counts as cancelled.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use tokentap::simulate::{SimConfig, Simulator};
//! let sim = Simulator::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap()).await?;
//! println!("POST {}/v1/chat/completions", sim.base_url());
//! sim.shutdown().await;
//! # Ok(()) }
//! ```

mod apis;
mod chunks;
mod config;
mod fault;
mod generate;
mod metrics;
mod render;
mod request;
mod service;
mod words;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

pub use config::{
    FaultRates, Flavor, OutputConfig, ReasoningField, SimConfig, SimConfigError, TimingConfig,
};
pub use fault::{FAULT_HEADER, FaultParseError, Faults};
pub use service::{SimAbort, SimBody};

use metrics::Shared;

/// The JSON field a simulator with `stamp_emit_time` adds to every streamed chunk: its emit
/// time, ns since the Unix epoch.
pub const EMIT_STAMP_FIELD: &str = "tokentap_emit_ns";

/// `created` of every response when a seed is set (2025-01-01T00:00:00Z), so seeded runs
/// are byte-for-byte repeatable.
pub const SEEDED_CREATED: u64 = 1_735_689_600;

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A snapshot of the simulator's counters (see [`Simulator::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Generation and embedding requests received, counted on arrival (including ones that
    /// fail validation or get an injected fault).
    pub requests: u64,
    /// Streaming responses whose headers were sent.
    pub streams_started: u64,
    /// Responses that reached their planned end: a full stream, a full JSON body, or an
    /// injected fault (status, in-band error, disconnect).
    pub completed: u64,
    /// Responses whose client went away before the end (the body, or the pending non-stream
    /// response, was dropped). Each is also logged.
    pub cancelled: u64,
    /// Responses in progress now: queued, prefilling or decoding.
    pub active: u64,
}

/// A simulator running in the background of the current tokio runtime, for tests and
/// embedding. Stops on [`Simulator::shutdown`] or when dropped (dropping aborts at once).
pub struct Simulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Simulator {
    /// Binds `addr` (use "127.0.0.1:0" in tests) and serves in a background task. Fails if
    /// the config does not validate or the address cannot be bound.
    pub async fn start(config: SimConfig, addr: SocketAddr) -> std::io::Result<Simulator> {
        config
            .validate()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let listener = bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Shared::new(config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, shared.clone(), async move {
            let _ = stopped.await;
        }));
        Ok(Simulator {
            addr,
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The bound address (with the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The counters now.
    pub fn stats(&self) -> SimStats {
        self.shared.counters.snapshot()
    }

    /// Stops accepting, lets open connections finish (up to `shutdown_grace_ms`), and waits
    /// for the server task. A panic in the server task is re-raised here.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%error, "simulator stopped with an error"),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => {}
            }
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Runs the simulator on `addr` until `shutdown` resolves, then drains open connections for
/// up to `shutdown_grace_ms`. Fails only if the config is invalid or `addr` cannot be bound;
/// accept errors are logged and never end the loop.
pub async fn run(
    config: SimConfig,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    config
        .validate()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let listener = bind(addr)?;
    tracing::info!(
        addr = %listener.local_addr()?,
        models = ?config.models,
        seed = ?config.seed,
        "simulator listening"
    );
    serve(listener, Shared::new(config), shutdown).await
}

/// Binds with a long accept backlog: a load test opening thousands of connections at once
/// would otherwise overflow the default one and wait for SYN retries (a second each).
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(8192)
}

async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(error) => {
                        // Out of file descriptors and the like: wait a little, keep serving.
                        tracing::warn!(%error, "simulator accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                let svc = hyper::service::service_fn(move |req| {
                    service::handle(shared.clone(), req)
                });
                let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(
                    async move {
                        if let Err(error) = conn.await {
                            tracing::debug!(%error, "simulator connection ended with an error");
                        }
                    }
                    .instrument(tracing::debug_span!("sim_conn", %peer)),
                );
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let grace = Duration::from_millis(shared.config.shutdown_grace_ms);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("simulator stopped: all connections closed"),
        () = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, "simulator stopped: grace period over, dropping open connections");
        }
    }
    Ok(())
}
