//! `tokentap bench` against known truth, its command line, and `tokentap demo`.

mod common;

use common::*;
use tokentap::bench::{self, BenchArgs};

#[tokio::test(start_paused = true)]
async fn bench_reports_the_configured_timings() {
    // TTFT 50 ms, one token every 10 ms, no jitter, on tokio's paused clock.
    let sim = sim(exact_sim(50.0, 10.0)).await;
    let mut args = BenchArgs::new(&sim.base_url(), MODEL);
    args.num_prompts = 20;
    args.max_concurrency = Some(5);
    args.random_input_len = 64;
    args.random_output_len = 16;
    args.disable_tqdm = true;
    let result = bench::run(&args).await.unwrap();
    assert_eq!(result.completed().count(), 20);
    for r in result.completed() {
        assert!((r.ttft - 0.050).abs() < 1e-6, "ttft {}", r.ttft);
        assert_eq!(r.output_tokens, 16);
        assert!(
            (r.latency - (0.050 + 15.0 * 0.010)).abs() < 1e-6,
            "latency {}",
            r.latency
        );
        assert!((r.tpot().unwrap() - 0.010).abs() < 1e-6);
        // The role chunk goes out with the first token and is no token (as in the current
        // `vllm bench serve`): no zero gap, every gap one decode step.
        assert_eq!(r.itl.len(), 15, "{:?}", r.itl);
        assert!(
            r.itl.iter().all(|g| (g - 0.010).abs() < 1e-6),
            "{:?}",
            r.itl
        );
    }
    let s = result.summary(&[99.0]);
    assert!((s.ttft_ms.mean - 50.0).abs() < 1e-3);
    assert!((s.tpot_ms.median - 10.0).abs() < 1e-3);
    assert!((s.itl_ms.percentiles[0].1 - 10.0).abs() < 1e-3);
    assert_eq!(s.total_output_tokens, 320);
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn goodput_counts_requests_within_bounds() {
    let sim = sim(exact_sim(50.0, 10.0)).await;
    let mut args = BenchArgs::new(&sim.base_url(), MODEL);
    args.num_prompts = 4;
    args.random_output_len = 8;
    args.random_input_len = 8;
    args.disable_tqdm = true;
    args.goodput = vec!["ttft:60".to_owned(), "tpot:10".to_owned()];
    let result = bench::run(&args).await.unwrap();
    assert_eq!(result.good(), 4);
    args.goodput = vec!["ttft:49".to_owned()];
    let result = bench::run(&args).await.unwrap();
    assert_eq!(result.good(), 0);
    let table = bench::report(&args, &result).unwrap();
    assert!(table.contains("Request goodput (req/s):"), "{table}");
    sim.shutdown().await;
}

#[tokio::test]
async fn bench_command_prints_the_vllm_layout_and_saves_results() {
    let sim = sim(exact_sim(5.0, 1.0)).await;
    let dir = std::env::temp_dir().join(format!("tokentap-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("r.json");
    let base = sim.base_url();
    let file_arg = file.to_str().unwrap().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tokentap"))
            .args([
                "bench",
                "--base-url",
                &base,
                "--model",
                MODEL,
                "--num-prompts",
                "6",
                "--random-input-len",
                "32",
                "--random-output-len",
                "8",
                "--request-rate",
                "200",
                "--percentile-metrics",
                "ttft,tpot,itl,e2el",
                "--metric-percentiles",
                "50,99",
                "--save-result",
                "--result-filename",
                &file_arg,
                "--disable-tqdm",
                "--endpoint",
                "/v1/completions",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "============ Serving Benchmark Result ============",
        "Successful requests:                     6",
        "Total generated tokens:                  48",
        "---------------Time to First Token----------------",
        "-----Time per Output Token (excl. 1st token)------",
        "---------------Inter-token Latency----------------",
        "----------------End-to-end Latency----------------",
        "P50 TTFT (ms):",
        "P99 E2EL (ms):",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in\n{stdout}");
    }
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(saved["completed"], 6);
    assert_eq!(saved["ttfts"].as_array().unwrap().len(), 6);
    assert_eq!(
        saved["itls"][0].as_array().unwrap().len(),
        7,
        "8 token events, 7 gaps"
    );
    assert_eq!(saved["output_lens"][0], 8);
    assert_eq!(saved["latencies"].as_array().unwrap().len(), 6);
    let ids: Vec<&str> = saved["request_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 6, "a unique x-request-id per request");
    std::fs::remove_dir_all(&dir).unwrap();
    sim.shutdown().await;
}

#[test]
fn demo_prints_client_and_proxy_side_by_side() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokentap"))
        .args([
            "demo",
            "--exit",
            "--num-prompts",
            "20",
            "--max-concurrency",
            "10",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("Successful requests"))
        .unwrap_or_else(|| panic!("no comparison table in\n{stdout}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cols[2..4], &["20.00", "20.00"], "{row}");
    for needle in ["Mean TTFT (ms)", "P99 ITL (ms)", "/metrics", "/stats"] {
        assert!(stdout.contains(needle), "missing {needle} in\n{stdout}");
    }
}

#[tokio::test]
async fn stats_endpoint_and_command_show_the_live_table() {
    let sim = sim(exact_sim(20.0, 5.0)).await;
    let proxy = tokentap::start(proxy_config(&sim.base_url()))
        .await
        .unwrap();
    let admin = proxy.admin_addr().unwrap();
    let c = client();
    for _ in 0..5 {
        let r = post(
            &c,
            &format!("http://{}/v1/chat/completions", proxy.addr()),
            &chat_body(8, true, ""),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let r = send(
        &c,
        http::Method::GET,
        &format!("http://{admin}/stats?percentiles=50,99.9"),
        "",
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let m = &v["models"][MODEL];
    assert_eq!(m["completed"], 5);
    assert_eq!(m["total_output_tokens"], 40);
    let ttft = m["ttft_ms"]["median"].as_f64().unwrap();
    assert!((18.0..25.0).contains(&ttft), "TTFT median {ttft} ms");
    assert_eq!(m["itl_ms"]["percentiles"][1][0], 99.9);
    assert_eq!(v["window_s"], 300.0);

    let r = send(
        &c,
        http::Method::GET,
        &format!("http://{admin}/stats?percentiles=abc"),
        "",
        &[],
    )
    .await;
    assert_eq!(r.status, 400);

    let admin_url = format!("http://{admin}");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tokentap"))
            .args(["stats", "--admin", &admin_url])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("tokentap: {MODEL}, last 300s")),
        "{text}"
    );
    assert!(
        text.contains("Successful requests:                     5"),
        "{text}"
    );
    assert!(text.contains("P99 TTFT (ms):"), "{text}");
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn simulator_exports_vllm_named_itl_and_ttft() {
    let sim = sim(exact_sim(30.0, 20.0)).await;
    let r = post(
        &client(),
        &format!("{}/v1/chat/completions", sim.base_url()),
        &chat_body(5, true, ""),
    )
    .await;
    assert_eq!(r.status, 200);
    let m = scrape_sim(&sim).await;
    let labels = [("model_name", MODEL)];
    // Role chunk and first token go out together, then four more tokens 20 ms apart.
    assert_eq!(
        value(&m, "vllm:inter_token_latency_seconds_count", &labels),
        4.0
    );
    assert!((value(&m, "vllm:inter_token_latency_seconds_sum", &labels) - 0.080).abs() < 1e-9);
    assert!((value(&m, "vllm:time_to_first_token_seconds_sum", &labels) - 0.030).abs() < 1e-9);
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn warmups_are_sent_first_and_left_out_of_the_results() {
    let sim = sim(exact_sim(30.0, 10.0)).await;
    let mut args = BenchArgs::new(&sim.base_url(), MODEL);
    args.num_prompts = 2;
    args.num_warmups = 3;
    args.max_concurrency = Some(1);
    args.random_input_len = 8;
    args.random_output_len = 4;
    args.disable_tqdm = true;
    let result = bench::run(&args).await.unwrap();
    assert_eq!(result.requests.len(), 2);
    assert!(
        result
            .requests
            .iter()
            .all(|r| r.success && !r.request_id.contains("warmup"))
    );
    // One request at a time: one kept-alive connection carries them all.
    assert!(
        result
            .requests
            .iter()
            .all(|r| r.local_addr == result.requests[0].local_addr)
    );
    let m = scrape_sim(&sim).await;
    // Five requests reached the server, each with a first token.
    assert_eq!(
        value(
            &m,
            "vllm:time_to_first_token_seconds_count",
            &[("model_name", MODEL)]
        ),
        5.0
    );
    sim.shutdown().await;
}
