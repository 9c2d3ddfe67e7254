//! The OpenAI endpoints Switchyard serves, as the policy interface names them.

/// An OpenAI endpoint that Switchyard serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/embeddings`.
    Embeddings,
}

impl Endpoint {
    /// The endpoint served at `path`, or `None` for any other path.
    pub fn from_path(path: &str) -> Option<Self> {
        match path {
            "/v1/chat/completions" => Some(Self::ChatCompletions),
            "/v1/completions" => Some(Self::Completions),
            "/v1/embeddings" => Some(Self::Embeddings),
            _ => None,
        }
    }

    /// The endpoint the WIT interface calls `name` (`chat-completions`,
    /// `completions`, `embeddings`), or `None`.
    pub fn from_wit_name(name: &str) -> Option<Self> {
        match name {
            "chat-completions" => Some(Self::ChatCompletions),
            "completions" => Some(Self::Completions),
            "embeddings" => Some(Self::Embeddings),
            _ => None,
        }
    }

    /// The URL path of the endpoint, e.g. `/v1/completions`.
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Embeddings => "/v1/embeddings",
        }
    }

    /// Short name for metric labels and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
        }
    }
}
