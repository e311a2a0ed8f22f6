use super::recorder::json_body;
use crate::sse::Dialect;
use bytes::Bytes;

#[test]
fn a_json_body_gives_its_usage_id_and_model_in_one_frame_or_several() {
    let body = r#"{"id":"chatcmpl-7","object":"chat.completion","created":1,"model":"m/x","choices":[{"index":0,"message":{"role":"assistant","content":"a \"b\" c","tool_calls":[]},"logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":2,"total_tokens":18,"completion_tokens":16},"prompt_logprobs":null}"#;
    for cuts in [vec![], vec![40], vec![1, 150, 151]] {
        let mut frames = Vec::new();
        let mut at = 0;
        for cut in cuts.iter().copied().chain([body.len()]) {
            frames.push(Bytes::copy_from_slice(&body.as_bytes()[at..cut]));
            at = cut;
        }
        let mut joined = Vec::new();
        let got = json_body(&frames, &mut joined, Dialect::Chat);
        let usage = got.usage.expect("usage is read");
        assert_eq!(
            (usage.prompt_tokens, usage.completion_tokens),
            (Some(2), Some(16))
        );
        assert_eq!((got.id, got.model), (Some("chatcmpl-7"), Some("m/x")));
    }
    let mut joined = Vec::new();
    let error = [Bytes::from_static(
        br#"{"error":{"message":"no","code":400}}"#,
    )];
    assert_eq!(json_body(&error, &mut joined, Dialect::Chat).usage, None);
}

mod per_upstream {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::time::{Instant, advance};

    use crate::config::Config;
    use crate::observe::{Ending, Recorder};
    use crate::route::Endpoint;
    use crate::telemetry::Telemetry;

    const A: &str = "http://10.0.0.1:8000";
    const B: &str = "http://10.0.0.2:8000";

    /// The value of the sample `series` (name and labels exactly as rendered).
    fn sample(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
            .parse()
            .unwrap()
    }

    fn has_series(text: &str, series: &str) -> bool {
        text.lines().any(|line| line.starts_with(series))
    }

    fn event(json: &str) -> Bytes {
        Bytes::from(format!("data: {json}\n\n"))
    }

    fn token(text: &str) -> Bytes {
        event(&format!(
            r#"{{"id":"c1","object":"chat.completion.chunk","model":"m","choices":[{{"index":0,"delta":{{"content":"{text}"}},"finish_reason":null}}]}}"#
        ))
    }

    async fn at(ms: u64, t0: Instant) -> Instant {
        let now = Instant::now();
        advance(t0 + Duration::from_millis(ms) - now).await;
        Instant::now()
    }

    /// The per-upstream histograms get exactly the figures of the main ones, at the same
    /// moments and under the same rules: TTFT at the first token whatever the ending, TPOT and
    /// E2EL only for requests that ended ok; a request no endpoint streamed to counts nowhere.
    #[tokio::test(start_paused = true)]
    async fn each_upstream_gets_the_ttft_tpot_and_e2el_of_the_requests_it_answered() {
        let telemetry = Arc::new(Telemetry::new(&Config::default()));
        let (a, b) = (
            telemetry.upstream_endpoint(A).latency,
            telemetry.upstream_endpoint(B).latency,
        );
        let route = telemetry.route(Arc::from("m"), Endpoint::Chat, None);
        let start = |t0| Recorder::new(telemetry.clone(), route.clone(), "r".into(), t0, None);

        // On A: head at 40 ms, vLLM's role-only chunk at 100 ms (no token), tokens at 250,
        // 300 and 350 ms, usage (3 tokens) at 360 ms, [DONE] at 370 ms.
        let t0 = Instant::now();
        let mut r = start(t0);
        r.set_upstream(a.clone());
        r.on_head(200, true, false, 1 << 20, at(40, t0).await);
        let role = event(
            r#"{"id":"c1","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
        );
        r.on_data(&role, at(100, t0).await, None);
        for (ms, text) in [(250, "a"), (300, "b"), (350, "c")] {
            r.on_data(&token(text), at(ms, t0).await, None);
        }
        let usage = event(
            r#"{"id":"c1","object":"chat.completion.chunk","model":"m","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}"#,
        );
        r.on_data(&usage, at(360, t0).await, None);
        r.on_data(
            &Bytes::from_static(b"data: [DONE]\n\n"),
            at(370, t0).await,
            None,
        );
        r.finish(Ending::Complete, at(380, t0).await);

        // On B: the first token at 500 ms, then the client goes away at 900 ms.
        let t0 = Instant::now();
        let mut r = start(t0);
        r.set_upstream(b.clone());
        r.on_head(200, true, false, 1 << 20, at(20, t0).await);
        r.on_data(&token("x"), at(500, t0).await, None);
        r.finish(Ending::Dropped, at(900, t0).await);

        // On B: a 503 answer, which has no token and does not end ok.
        let t0 = Instant::now();
        let mut r = start(t0);
        r.set_upstream(b.clone());
        r.on_head(503, false, true, 1 << 20, at(10, t0).await);
        r.on_data(&Bytes::from_static(b"{}"), at(11, t0).await, None);
        r.finish(Ending::Complete, at(12, t0).await);

        // A request the proxy answered itself (no endpoint answered it).
        start(Instant::now()).finish_without_body(
            crate::telemetry::Outcome::ConnectError,
            502,
            Instant::now(),
        );

        let text = telemetry.render(false);
        let secs = |ms: u64| Duration::from_millis(ms).as_secs_f64();
        let ttft = "tokentap_upstream_time_to_first_token_seconds";
        let tpot = "tokentap_upstream_time_per_output_token_seconds";
        let e2el = "tokentap_upstream_e2e_request_latency_seconds";
        let up = |name: &str, part: &str, upstream: &str| {
            sample(&text, &format!("{name}_{part}{{upstream=\"{upstream}\"}}"))
        };
        assert_eq!(up(ttft, "count", A), 1.0);
        assert_eq!(up(ttft, "sum", A), secs(250));
        assert_eq!(up(e2el, "count", A), 1.0);
        assert_eq!(up(e2el, "sum", A), secs(350));
        assert_eq!(up(tpot, "count", A), 1.0);
        assert_eq!(up(tpot, "sum", A), secs(50));
        // The bucket bounds are the main histograms' (vLLM's): 0.25 s is in le="0.25", not
        // in le="0.1".
        let bucket = |name: &str, upstream: &str, le: &str| {
            sample(
                &text,
                &format!("{name}_bucket{{upstream=\"{upstream}\",le=\"{le}\"}}"),
            )
        };
        assert_eq!(bucket(ttft, A, "0.1"), 0.0);
        assert_eq!(bucket(ttft, A, "0.25"), 1.0);
        assert_eq!(bucket(e2el, A, "0.3"), 0.0);
        assert_eq!(bucket(e2el, A, "0.5"), 1.0);
        // B: the TTFT of the request whose client went away, no E2EL or TPOT.
        assert_eq!(up(ttft, "count", B), 1.0);
        assert_eq!(up(ttft, "sum", B), secs(500));
        assert_eq!(up(e2el, "count", B), 0.0);
        assert_eq!(up(tpot, "count", B), 0.0);
        // Per upstream they add up to the main histograms.
        let main = |name: &str, part: &str| {
            sample(
                &text,
                &format!("{name}_{part}{{model=\"m\",endpoint=\"chat\"}}"),
            )
        };
        for (name, main_name) in [
            (ttft, "tokentap_time_to_first_token_seconds"),
            (tpot, "tokentap_time_per_output_token_seconds"),
            (e2el, "tokentap_e2e_request_latency_seconds"),
        ] {
            for part in ["count", "sum"] {
                assert_eq!(
                    up(name, part, A) + up(name, part, B),
                    main(main_name, part),
                    "{name}_{part}"
                );
            }
        }
        // Only `upstream` labels them: no model, endpoint or tenant.
        assert!(!has_series(&text, &format!("{ttft}_count{{model")));
    }
}
