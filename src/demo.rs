//! `tokentap demo`: the simulator, the proxy and a bench run in one process, and the client's
//! figures printed beside the proxy's.

use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::bench::{self, Backend, BenchArgs};
use crate::config::Config;
use crate::report::{Distribution, ModelSummary, fmt_pct};
use crate::simulate::{Flavor, SimConfig, Simulator};

/// `tokentap demo` options.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Requests the bench run sends through the proxy.
    #[arg(long, default_value_t = 300)]
    pub num_prompts: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    pub max_concurrency: usize,
    /// Where the proxy listens (port 0: a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Where the admin listener (/metrics, /stats) listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub admin_listen: SocketAddr,
    /// End after printing the comparison instead of serving until Ctrl-C.
    #[arg(long)]
    pub exit: bool,
    /// Response shapes of the simulated server: `vllm` or `llama.cpp`.
    #[arg(long, default_value_t = Flavor::Vllm)]
    pub flavor: Flavor,
    /// The API the bench run speaks: openai-chat (default), openai, openai-responses or
    /// anthropic-messages.
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
}

/// Percentiles the comparison shows.
const PERCENTILES: [f64; 2] = [90.0, 99.0];

/// Runs the demo; returns the printed comparison.
pub async fn run(
    args: &DemoArgs,
    shutdown: impl Future<Output = ()>,
) -> Result<String, Box<dyn std::error::Error>> {
    let sim_config = SimConfig {
        flavor: args.flavor,
        ..SimConfig::default()
    };
    let sim = Simulator::start(sim_config, "127.0.0.1:0".parse()?).await?;
    let model = SimConfig::default()
        .models
        .first()
        .cloned()
        .unwrap_or_else(|| "model".to_owned());
    let mut config = Config {
        listen: args.listen,
        admin_listen: Some(args.admin_listen),
        ..Config::default()
    };
    config.upstream.url = sim.base_url();
    config.telemetry.models = vec![model.clone()];
    config.telemetry.access_log = false;
    let proxy = crate::start(config).await?;
    let admin = proxy.admin_addr().ok_or("the admin listener is off")?;
    eprintln!(
        "tokentap demo: simulator at {}, proxy at http://{}, sending {} requests ({} at a time)...",
        sim.base_url(),
        proxy.addr(),
        args.num_prompts,
        args.max_concurrency
    );
    let mut bench_args = BenchArgs::new(&format!("http://{}", proxy.addr()), &model);
    bench_args.num_prompts = args.num_prompts;
    bench_args.backend = args.backend;
    bench_args.max_concurrency = Some(args.max_concurrency);
    bench_args.random_input_len = 512;
    bench_args.random_output_len = 96;
    bench_args.random_range_ratio = 0.5;
    bench_args.percentile_metrics = "ttft,tpot,itl,e2el".to_owned();
    bench_args.metric_percentiles = "90,99".to_owned();
    let result = bench::run(&bench_args).await?;
    let client = result.summary(&PERCENTILES);
    let report = proxy
        .telemetry()
        .stats
        .report(tokio::time::Instant::now(), &PERCENTILES);
    let mut out = String::new();
    match report.models.get(&model) {
        Some(server) => out.push_str(&compare(&client, server)),
        None => out.push_str("the proxy recorded no request\n"),
    }
    let backend = Backend::of(&bench_args);
    let example = match backend {
        Backend::OpenaiResponses => format!(r#"{{"model":"{model}","input":"hi","stream":true}}"#),
        Backend::AnthropicMessages => format!(
            r#"{{"model":"{model}","max_tokens":64,"messages":[{{"role":"user","content":"hi"}}],"stream":true}}"#
        ),
        Backend::Openai => format!(r#"{{"model":"{model}","prompt":"hi","stream":true}}"#),
        Backend::OpenaiChat => format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"stream":true}}"#
        ),
    };
    let _ = writeln!(
        out,
        "\nproxy:      http://{}  (try: curl http://{}{} -H 'content-type: application/json' -d '{example}')",
        proxy.addr(),
        proxy.addr(),
        backend.path()
    );
    let _ = writeln!(out, "metrics:    http://{admin}/metrics");
    let _ = writeln!(
        out,
        "stats:      http://{admin}/stats?format=text  (or: tokentap stats --admin http://{admin})"
    );
    let _ = writeln!(out, "simulator:  {}", sim.base_url());
    print!("{out}");
    if !args.exit {
        println!("serving until Ctrl-C");
        shutdown.await;
    }
    proxy.shutdown().await;
    sim.shutdown().await;
    Ok(out)
}

/// The client's and the proxy's figures side by side.
pub fn compare(client: &ModelSummary, proxy: &ModelSummary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:=^78}",
        " tokentap demo: client (tokentap bench) vs proxy (/stats) "
    );
    let _ = writeln!(
        out,
        "{:<28}{:>14}{:>14}{:>12}{:>10}",
        "", "client", "proxy", "diff", "diff %"
    );
    let row = |out: &mut String, name: &str, c: f64, p: f64| {
        let pct = if c.abs() > f64::EPSILON {
            (p - c) / c * 100.0
        } else {
            0.0
        };
        let _ = writeln!(
            out,
            "{name:<28}{c:>14.2}{p:>14.2}{:>12.2}{pct:>9.2}%",
            p - c
        );
    };
    row(
        &mut out,
        "Successful requests",
        client.completed as f64,
        proxy.completed as f64,
    );
    row(
        &mut out,
        "Total generated tokens",
        client.total_output_tokens as f64,
        proxy.total_output_tokens as f64,
    );
    for (name, c, p) in [
        ("TTFT", &client.ttft_ms, &proxy.ttft_ms),
        ("TPOT", &client.tpot_ms, &proxy.tpot_ms),
        ("ITL", &client.itl_ms, &proxy.itl_ms),
        ("E2EL", &client.e2el_ms, &proxy.e2el_ms),
    ] {
        let _ = writeln!(out, "{:-^78}", "");
        rows(&mut out, name, c, p, &row);
    }
    let _ = writeln!(out, "{}", "=".repeat(78));
    out
}

fn rows(
    out: &mut String,
    name: &str,
    c: &Distribution,
    p: &Distribution,
    row: &dyn Fn(&mut String, &str, f64, f64),
) {
    row(out, &format!("Mean {name} (ms)"), c.mean, p.mean);
    row(out, &format!("Median {name} (ms)"), c.median, p.median);
    for ((pc, vc), (_, vp)) in c.percentiles.iter().zip(&p.percentiles) {
        row(out, &format!("P{} {name} (ms)", fmt_pct(*pc)), *vc, *vp);
    }
}
