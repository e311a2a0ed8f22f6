//! The `tokentap` command line: `serve`, `simulate` and `check-config`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Transparent streaming proxy for vLLM / OpenAI-compatible servers with TTFT/TPOT/ITL/E2EL telemetry.
#[derive(Debug, Parser)]
#[command(name = "tokentap", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a vLLM-like OpenAI-compatible server (no GPU, no model) for demos, tests and load tests.
    Simulate {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: SocketAddr,
        /// Seed: the same request gets the same ids, text, token counts and timings.
        #[arg(long)]
        seed: Option<u64>,
        /// TOML file with simulator settings (timing model, models, faults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("tokentap: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), Box<dyn std::error::Error>> = runtime.block_on(async move {
        match cli.command {
            Command::Simulate {
                listen,
                seed,
                config,
            } => {
                let mut sim = match config {
                    Some(path) => tokentap::simulate::SimConfig::load(&path)?,
                    None => tokentap::simulate::SimConfig::default(),
                };
                if seed.is_some() {
                    sim.seed = seed;
                }
                tokentap::simulate::run(sim, listen, tokentap::shutdown_signal()).await?;
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tokentap: {error}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOKENTAP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}
