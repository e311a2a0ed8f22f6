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
