//! The `tokentap` command line: `serve`, `simulate` and `check-config`.
//!
//! Exit codes: 0 after a clean shutdown, 1 on a runtime failure, 2 on a bad configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokentap::config::{Config, LogFormat};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Transparent streaming proxy for vLLM / OpenAI-compatible servers with TTFT/TPOT/ITL/E2EL telemetry.
#[derive(Debug, Parser)]
#[command(name = "tokentap", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy: forward to the upstream and export latency telemetry.
    Serve {
        /// TOML configuration file (see config/tokentap.toml).
        #[arg(long, env = "TOKENTAP_CONFIG")]
        config: Option<PathBuf>,
        /// Address clients connect to [default: 0.0.0.0:8080].
        #[arg(long, env = "TOKENTAP_LISTEN")]
        listen: Option<SocketAddr>,
        /// Upstream base URL [default: http://127.0.0.1:8000].
        #[arg(long, env = "TOKENTAP_UPSTREAM")]
        upstream: Option<String>,
        /// Admin listener address (/metrics, /healthz, /readyz) [default: 127.0.0.1:9464].
        #[arg(long, env = "TOKENTAP_ADMIN_LISTEN")]
        admin_listen: Option<SocketAddr>,
    },
    /// Send a workload to an OpenAI-compatible server and measure it like `vllm bench serve`.
    Bench(Box<tokentap::bench::BenchArgs>),
    /// Print the proxy's live summary (`/stats` of its admin listener).
    Stats {
        /// Base URL of the admin listener.
        #[arg(long, default_value = "http://127.0.0.1:9464")]
        admin: String,
        /// One tenant's summary across models instead of one per model (`*`: every tenant's);
        /// needs `telemetry.tenant_header`.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Start the simulator and the proxy, send a bench workload through the proxy, and print the
    /// client's and the proxy's figures side by side.
    Demo(tokentap::demo::DemoArgs),
    /// Validate a configuration file; on error, name the field and exit 2.
    CheckConfig {
        /// The file.
        file: PathBuf,
    },
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
        /// Response shapes: `vllm` or `llama.cpp`; overrides `flavor` in the file [default: vllm].
        #[arg(long)]
        flavor: Option<tokentap::simulate::Flavor>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut log_format = LogFormat::Text;
    let serve_config = match &cli.command {
        Command::CheckConfig { file } => {
            return match Config::load(file) {
                Ok(_) => {
                    println!("{}: ok", file.display());
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("tokentap: {error}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Serve {
            config,
            listen,
            upstream,
            admin_listen,
        } => {
            let source = tokentap::config::Source {
                path: config.clone(),
                overrides: tokentap::config::Overrides {
                    listen: *listen,
                    upstream: upstream.clone(),
                    admin_listen: *admin_listen,
                },
            };
            let c = match source.load() {
                Ok(c) => c,
                Err(error) => {
                    eprintln!("tokentap: {error}");
                    return ExitCode::from(2);
                }
            };
            log_format = c.telemetry.log_format;
            Some((c, source))
        }
        _ => None,
    };
    init_logging(log_format);
    let workers = serve_config.as_ref().and_then(|(c, _)| c.workers);
    let runtime = match tokentap::runtime(workers) {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("tokentap: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), Box<dyn std::error::Error>> = runtime.block_on(async move {
        match cli.command {
            Command::Serve { .. } => {
                let (config, source) = serve_config.expect("serve config was loaded above");
                tokentap::run_from(config, source, tokentap::shutdown_signal()).await?;
                Ok(())
            }
            Command::CheckConfig { .. } => Ok(()),
            Command::Bench(args) => {
                let result = tokentap::bench::run(&args).await?;
                print!("{}", tokentap::bench::report(&args, &result)?);
                if args.save_result {
                    let path = tokentap::bench::save(&args, &result)?;
                    eprintln!("results written to {}", path.display());
                }
                Ok(())
            }
            Command::Stats { admin, tenant } => {
                let stats = tokentap::bench::fetch_stats(&admin, tenant.as_deref()).await?;
                print!("{stats}");
                Ok(())
            }
            Command::Demo(args) => {
                tokentap::demo::run(&args, tokentap::shutdown_signal()).await?;
                Ok(())
            }
            Command::Simulate {
                listen,
                seed,
                config,
                flavor,
            } => {
                let mut sim = match config {
                    Some(path) => tokentap::simulate::SimConfig::load(&path)?,
                    None => tokentap::simulate::SimConfig::default(),
                };
                if seed.is_some() {
                    sim.seed = seed;
                }
                if let Some(flavor) = flavor {
                    sim.flavor = flavor;
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

/// Logs go to stderr; `TOKENTAP_LOG` takes a tracing filter (default `info`).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOKENTAP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
