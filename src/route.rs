//! What a request is: the endpoint it is for, and what its body says (a leaf: every layer may
//! use it, it uses nothing of the crate).

use http::Method;

/// The API a request is for, the `endpoint` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
    /// `/v1/embeddings`.
    Embeddings,
    /// `/v1/models`.
    Models,
    /// `/v1/responses`: the OpenAI Responses API.
    Responses,
    /// `/v1/messages`: the Anthropic Messages API.
    Messages,
    /// Anything else.
    Other,
}

impl Endpoint {
    /// Classifies a request path (the query is not part of it).
    pub fn from_path(path: &str) -> Endpoint {
        match path.trim_end_matches('/') {
            "/v1/chat/completions" => Endpoint::Chat,
            "/v1/completions" => Endpoint::Completions,
            "/v1/embeddings" => Endpoint::Embeddings,
            "/v1/models" => Endpoint::Models,
            "/v1/responses" => Endpoint::Responses,
            "/v1/messages" => Endpoint::Messages,
            _ => Endpoint::Other,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Models => "models",
            Endpoint::Responses => "responses",
            Endpoint::Messages => "messages",
            Endpoint::Other => "other",
        }
    }

    /// The endpoints that generate tokens: chat, completions, responses and messages.
    pub fn is_generation(self) -> bool {
        matches!(
            self,
            Endpoint::Chat | Endpoint::Completions | Endpoint::Responses | Endpoint::Messages
        )
    }

    /// Whether the endpoint takes OpenAI's `stream_options`, so that the proxy may ask for usage
    /// on a client's behalf: chat and completions. Responses and Messages streams always end
    /// with their usage, and their requests are never rewritten.
    pub fn takes_stream_options(self) -> bool {
        matches!(self, Endpoint::Chat | Endpoint::Completions)
    }

    /// Whether a request to this endpoint with this method has its body read and inspected.
    pub fn inspects_body(self, method: &Method) -> bool {
        self.is_generation() && method == Method::POST
    }
}

/// What the body of a chat/completions request says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// The body was a JSON object with fields of the expected types.
    pub parsed: bool,
    /// `model`.
    pub model: Option<String>,
    /// `stream`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// `stream_options.continuous_usage_stats` (vLLM).
    pub continuous_usage: bool,
    /// The body has a `stream_options` key (of any value).
    pub has_stream_options: bool,
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<u64>,
    /// `n` (1 when absent).
    pub n: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(Endpoint::from_path("/v1/chat/completions"), Endpoint::Chat);
        assert_eq!(
            Endpoint::from_path("/v1/completions/"),
            Endpoint::Completions
        );
        assert_eq!(Endpoint::from_path("/v1/embeddings"), Endpoint::Embeddings);
        assert_eq!(Endpoint::from_path("/v1/models"), Endpoint::Models);
        assert_eq!(Endpoint::from_path("/v1/responses"), Endpoint::Responses);
        assert_eq!(Endpoint::from_path("/v1/messages/"), Endpoint::Messages);
        assert_eq!(Endpoint::Responses.as_str(), "responses");
        assert_eq!(Endpoint::Messages.as_str(), "messages");
        assert!(Endpoint::Messages.inspects_body(&Method::POST));
        assert!(Endpoint::Chat.takes_stream_options());
        assert!(!Endpoint::Responses.takes_stream_options());
        assert!(!Endpoint::Messages.takes_stream_options());
        assert_eq!(Endpoint::from_path("/health"), Endpoint::Other);
        assert!(Endpoint::Chat.inspects_body(&Method::POST));
        assert!(!Endpoint::Chat.inspects_body(&Method::GET));
        assert!(!Endpoint::Embeddings.inspects_body(&Method::POST));
    }
}
