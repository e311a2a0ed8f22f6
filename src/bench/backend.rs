//! Which API `tokentap bench` speaks (`--backend`, named as in `vllm bench serve`): the request
//! body it sends and the event rules it times the answer by.

use bytes::Bytes;
use serde_json::json;

use super::BenchArgs;
use super::dataset::Sample;
use crate::sse::Dialect;

/// The API a run's requests are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// `/v1/chat/completions`.
    OpenaiChat,
    /// `/v1/completions`.
    Openai,
    /// `/v1/responses`, timed like `vllm bench serve --backend openai-responses` (tool-call
    /// argument deltas count as output too, as they do in the proxy).
    OpenaiResponses,
    /// `/v1/messages` (Anthropic's Messages API, which vLLM serves).
    AnthropicMessages,
}

impl Backend {
    /// The backend of a run: `--backend` when given, else what `--endpoint` names.
    pub fn of(args: &BenchArgs) -> Backend {
        if let Some(b) = args.backend {
            return b;
        }
        let path = args.endpoint.trim_end_matches('/');
        if path.ends_with("/responses") {
            Backend::OpenaiResponses
        } else if path.ends_with("/messages") {
            Backend::AnthropicMessages
        } else if path.contains("chat") {
            Backend::OpenaiChat
        } else {
            Backend::Openai
        }
    }

    /// The API path of the backend's requests.
    pub fn path(self) -> &'static str {
        match self {
            Backend::OpenaiChat => "/v1/chat/completions",
            Backend::Openai => "/v1/completions",
            Backend::OpenaiResponses => "/v1/responses",
            Backend::AnthropicMessages => "/v1/messages",
        }
    }

    /// The path a run sends to: `--endpoint`, unless `--backend` names another API and
    /// `--endpoint` was left at its default.
    pub fn endpoint(self, args: &BenchArgs) -> String {
        if args.backend.is_some() && args.endpoint == BenchArgs::DEFAULT_ENDPOINT {
            self.path().to_owned()
        } else {
            args.endpoint.clone()
        }
    }

    /// The event rules its streams follow.
    pub fn dialect(self) -> Dialect {
        match self {
            Backend::OpenaiChat | Backend::Openai => Dialect::Chat,
            Backend::OpenaiResponses => Dialect::Responses,
            Backend::AnthropicMessages => Dialect::Messages,
        }
    }

    /// The body of one streaming request for `s`, as `vllm bench serve` sends it.
    pub fn request_body(self, args: &BenchArgs, s: &Sample) -> Bytes {
        let mut body = match self {
            Backend::OpenaiChat => return super::request_body(args, true, s),
            Backend::Openai => return super::request_body(args, false, s),
            Backend::OpenaiResponses => json!({
                "model": args.model,
                "input": s.prompt,
                "temperature": 0.0,
                "max_output_tokens": s.output_len,
                "stream": true,
            }),
            Backend::AnthropicMessages => json!({
                "model": args.model,
                "messages": [{"role": "user", "content": s.prompt}],
                "temperature": 0.0,
                "max_tokens": s.output_len,
                "stream": true,
            }),
        };
        if args.ignore_eos {
            body["ignore_eos"] = serde_json::Value::Bool(true);
        }
        Bytes::from(body.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> BenchArgs {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            args: BenchArgs,
        }
        let mut argv = vec!["bench", "--model", "m"];
        argv.extend_from_slice(extra);
        Wrap::parse_from(argv).args
    }

    #[test]
    fn the_backend_picks_path_body_and_rules() {
        let a = args(&["--backend", "openai-responses"]);
        let b = Backend::of(&a);
        assert_eq!(b, Backend::OpenaiResponses);
        assert_eq!(b.endpoint(&a), "/v1/responses");
        assert_eq!(b.dialect(), Dialect::Responses);
        let sample = Sample {
            prompt: "hi".to_owned(),
            prompt_len: 1,
            output_len: 7,
        };
        let body: serde_json::Value = serde_json::from_slice(&b.request_body(&a, &sample)).unwrap();
        assert_eq!(body["input"], "hi");
        assert_eq!(body["max_output_tokens"], 7);
        assert!(
            body.get("stream_options").is_none(),
            "Responses has no stream_options"
        );

        let a = args(&["--backend", "anthropic-messages", "--ignore-eos"]);
        let b = Backend::of(&a);
        assert_eq!(b.endpoint(&a), "/v1/messages");
        let body: serde_json::Value = serde_json::from_slice(&b.request_body(&a, &sample)).unwrap();
        assert_eq!(body["max_tokens"], 7);
        assert_eq!(body["ignore_eos"], true);

        // Without --backend, the endpoint says which API it is; an explicit endpoint wins.
        assert_eq!(Backend::of(&args(&[])), Backend::OpenaiChat);
        let a = args(&["--endpoint", "/v1/messages"]);
        assert_eq!(Backend::of(&a), Backend::AnthropicMessages);
        let a = args(&[
            "--backend",
            "openai-responses",
            "--endpoint",
            "/proxy/v1/responses",
        ]);
        assert_eq!(Backend::of(&a).endpoint(&a), "/proxy/v1/responses");
        assert_eq!(
            Backend::of(&args(&["--endpoint", "/v1/completions"])),
            Backend::Openai
        );
    }
}
