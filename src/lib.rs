//! tokentap: a transparent streaming reverse proxy that measures what users of an
//! OpenAI-compatible LLM server feel (TTFT, TPOT, ITL, E2EL) on live traffic.
//!
//! [`start`] runs the proxy and its admin listener in the background (what tests and benches
//! use); [`run`] runs them until a shutdown future resolves (what `tokentap serve` uses).

pub mod admin;
pub mod app;
pub mod bench;
pub mod config;
pub mod demo;
pub mod http1;
pub mod latency;
pub mod net;
pub mod observe;
pub mod proxy;
pub mod report;
pub mod route;
pub mod server;
pub mod simulate;
pub mod sse;
pub mod telemetry;
pub mod upstream;

pub use app::{
    Running, StartError, run, run_from, runtime, shutdown_signal, start, start_from, start_with,
};
