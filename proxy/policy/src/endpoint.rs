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

    /// The WIT interface's name of the endpoint, the inverse of
    /// [`Endpoint::from_wit_name`].
    pub fn wit_name(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat-completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wit_names_and_paths_round_trip() {
        for endpoint in [
            Endpoint::ChatCompletions,
            Endpoint::Completions,
            Endpoint::Embeddings,
        ] {
            assert_eq!(Endpoint::from_wit_name(endpoint.wit_name()), Some(endpoint));
            assert_eq!(Endpoint::from_path(endpoint.path()), Some(endpoint));
        }
    }
}
