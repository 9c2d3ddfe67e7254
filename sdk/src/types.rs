//! Plain Rust views of the WIT `types` interface: what a policy is told
//! about a request and what it answers.
//!
//! The structs are `#[non_exhaustive]` so that later SDK versions can add
//! fields (fed from WIT `attributes` or a newer package) without breaking
//! plugins; build them with the constructors and `with_*` methods.

/// The OpenAI endpoint a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/embeddings`.
    Embeddings,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`, as the client sent it.
    pub role: String,
    /// The message text; non-text parts are left out.
    pub content: String,
    /// Further facts from the host, as key/value pairs; empty for now.
    pub attributes: Vec<(String, String)>,
}

impl Message {
    /// A message with the given role and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
            attributes: Vec::new(),
        }
    }
}

/// What a policy is told about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Request {
    /// The endpoint the request arrived on.
    pub endpoint: Endpoint,
    /// The `model` field exactly as the client sent it.
    pub model: String,
    /// Chat messages, in order (chat completions only).
    pub messages: Vec<Message>,
    /// Prompt items (completions) or inputs (embeddings) given as text.
    pub prompt: Vec<String>,
    /// Characters in all messages, prompts or inputs together.
    pub prompt_chars: u64,
    /// The client's `max_tokens`, if set.
    pub max_tokens: Option<u32>,
    /// Whether the client asked for a streamed response.
    pub stream: bool,
    /// Request headers as (name, value); names are lowercase.
    pub headers: Vec<(String, String)>,
    /// Further facts from the host, as key/value pairs; empty for now.
    pub attributes: Vec<(String, String)>,
}

impl Request {
    /// An empty request for `model` on `endpoint`, for tests: no messages,
    /// no prompt, no headers, zero characters, not streamed.
    pub fn new(endpoint: Endpoint, model: impl Into<String>) -> Self {
        Request {
            endpoint,
            model: model.into(),
            messages: Vec::new(),
            prompt: Vec::new(),
            prompt_chars: 0,
            max_tokens: None,
            stream: false,
            headers: Vec::new(),
            attributes: Vec::new(),
        }
    }

    /// The value of the first header called `name`, compared without
    /// regard to ASCII case.
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name, str::eq_ignore_ascii_case)
    }

    /// The value of the first attribute called `key` (exact match).
    pub fn attribute(&self, key: &str) -> Option<&str> {
        find(&self.attributes, key, |a, b| a == b)
    }

    /// Sets the character count.
    pub fn with_prompt_chars(mut self, chars: u64) -> Self {
        self.prompt_chars = chars;
        self
    }

    /// Adds a header; the name is stored lowercase, as the host does.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let name = name.into().to_ascii_lowercase();
        self.headers.push((name, value.into()));
        self
    }

    /// Appends a chat message and counts its characters.
    pub fn with_message(mut self, message: Message) -> Self {
        self.prompt_chars += message.content.chars().count() as u64;
        self.messages.push(message);
        self
    }

    /// Appends a prompt item and counts its characters.
    pub fn with_prompt(mut self, prompt: impl Into<String>) -> Self {
        let prompt = prompt.into();
        self.prompt_chars += prompt.chars().count() as u64;
        self.prompt.push(prompt);
        self
    }

    /// Sets the client's `max_tokens`.
    pub fn with_max_tokens(mut self, max_tokens: u32) -> Self {
        self.max_tokens = Some(max_tokens);
        self
    }

    /// Marks the request as streamed.
    pub fn with_stream(mut self, stream: bool) -> Self {
        self.stream = stream;
        self
    }

    /// Adds an attribute.
    pub fn with_attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.push((key.into(), value.into()));
        self
    }
}

/// Send the request to a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Route {
    /// Name of the pool that serves the request.
    pub pool: String,
    /// Upper bound on generated tokens; the host sends the smaller of this
    /// and the client's `max_tokens`. `None` (the default) leaves the
    /// client's value alone.
    pub max_tokens_cap: Option<u32>,
    /// Hints to the host; none are defined yet.
    pub attributes: Vec<(String, String)>,
}

impl Route {
    /// A route to `pool` with no cap and no attributes.
    pub fn new(pool: impl Into<String>) -> Self {
        Route {
            pool: pool.into(),
            max_tokens_cap: None,
            attributes: Vec::new(),
        }
    }

    /// Caps the tokens generated at `cap`.
    pub fn with_max_tokens_cap(mut self, cap: u32) -> Self {
        self.max_tokens_cap = Some(cap);
        self
    }

    /// Adds a hint for the host.
    pub fn with_attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.push((key.into(), value.into()));
        self
    }
}

/// Refuse the request without sending it upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Rejection {
    /// HTTP status for the client, 400 to 599 (others become 500).
    pub status: u16,
    /// Reason returned in the OpenAI error body.
    pub message: String,
    /// Hints to the host; none are defined yet.
    pub attributes: Vec<(String, String)>,
}

impl Rejection {
    /// A rejection with `status` and `message` and no attributes.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Rejection {
            status,
            message: message.into(),
            attributes: Vec::new(),
        }
    }
}

/// A policy's answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Serve the request from a pool.
    Route(Route),
    /// Answer the client with an error.
    Reject(Rejection),
}

impl Decision {
    /// Route to `pool` with no token cap.
    pub fn route(pool: impl Into<String>) -> Self {
        Decision::Route(Route::new(pool))
    }

    /// Reject with HTTP `status` and `message`.
    pub fn reject(status: u16, message: impl Into<String>) -> Self {
        Decision::Reject(Rejection::new(status, message))
    }

    /// The pool routed to, or `None` for a rejection.
    pub fn pool(&self) -> Option<&str> {
        match self {
            Decision::Route(route) => Some(&route.pool),
            Decision::Reject(_) => None,
        }
    }
}

impl From<Route> for Decision {
    fn from(route: Route) -> Self {
        Decision::Route(route)
    }
}

impl From<Rejection> for Decision {
    fn from(rejection: Rejection) -> Self {
        Decision::Reject(rejection)
    }
}

fn find<'a>(
    pairs: &'a [(String, String)],
    name: &str,
    eq: impl Fn(&str, &str) -> bool,
) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| eq(k, name))
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lookup_ignores_name_case() {
        let req = Request::new(Endpoint::ChatCompletions, "auto").with_header("X-Tier", "premium");
        assert_eq!(req.header("x-tier"), Some("premium"));
        assert_eq!(req.header("X-TIER"), Some("premium"));
        assert_eq!(req.header("x-other"), None);
    }

    #[test]
    fn builders_count_prompt_characters() {
        let req = Request::new(Endpoint::ChatCompletions, "auto")
            .with_message(Message::new("user", "héllo"))
            .with_prompt("abc");
        assert_eq!(req.prompt_chars, 8);
    }

    #[test]
    fn decision_route_names_the_pool() {
        assert_eq!(Decision::route("small").pool(), Some("small"));
        assert_eq!(Decision::reject(403, "no").pool(), None);
    }
}
