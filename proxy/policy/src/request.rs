//! What a plugin is told about a request: facts handed over with every
//! call, and content (messages, prompts, headers) read only when the
//! plugin asks for it.

use std::fmt;
use std::sync::Arc;

use crate::Endpoint;

/// One chat message as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`, as the client sent it.
    pub role: String,
    /// The message text; non-text parts are left out.
    pub content: String,
}

/// Where a request's messages, prompts and headers come from when a plugin
/// reads them. The proxy implements it over the request it already parsed,
/// so a plugin that reads none of them costs no copy; [`OwnedContent`]
/// holds them as plain values.
pub trait RequestContent: fmt::Debug + Send + Sync {
    /// Chat messages, in order (chat completions only).
    fn messages(&self) -> Vec<Message>;
    /// Prompt items (completions) or inputs (embeddings) as text.
    fn prompt(&self) -> Vec<String>;
    /// The first value of header `name`, whatever the case of `name`.
    fn header(&self, name: &str) -> Option<String>;
    /// Every header, names lowercase, in order of first arrival (a repeated
    /// name's values together).
    fn headers(&self) -> Vec<(String, String)>;
}

/// Request content as plain values, for requests built in code: tests,
/// fixtures, trial requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnedContent {
    pub messages: Vec<Message>,
    pub prompt: Vec<String>,
    /// Names lowercase.
    pub headers: Vec<(String, String)>,
}

impl RequestContent for OwnedContent {
    fn messages(&self) -> Vec<Message> {
        self.messages.clone()
    }

    fn prompt(&self) -> Vec<String> {
        self.prompt.clone()
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.clone())
    }

    fn headers(&self) -> Vec<(String, String)> {
        self.headers.clone()
    }
}

/// What the policy is told about a request.
#[derive(Debug, Clone)]
pub struct RouteRequest {
    /// The endpoint the request arrived on.
    pub endpoint: Endpoint,
    /// The `model` field as the client sent it.
    pub model: String,
    /// Chat messages in the request (chat completions only).
    pub message_count: u32,
    /// Characters in all messages, prompts or inputs together.
    pub prompt_chars: u64,
    /// The client's `max_tokens`, if set.
    pub max_tokens: Option<u32>,
    /// Whether the client asked for a streamed response.
    pub stream: bool,
    content: Content,
}

#[derive(Debug, Clone)]
enum Content {
    Owned(OwnedContent),
    Shared(Arc<dyn RequestContent>),
}

impl RouteRequest {
    /// A request for `model` on `endpoint` with no content or headers.
    pub fn new(endpoint: Endpoint, model: impl Into<String>) -> Self {
        RouteRequest {
            endpoint,
            model: model.into(),
            message_count: 0,
            prompt_chars: 0,
            max_tokens: None,
            stream: false,
            content: Content::Owned(OwnedContent::default()),
        }
    }

    /// Reads messages, prompts and headers from `content`, which the
    /// caller describes in the facts (`message_count`, `prompt_chars`).
    pub fn with_content(mut self, content: Arc<dyn RequestContent>) -> Self {
        self.content = Content::Shared(content);
        self
    }

    /// Adds a chat message, counted in `message_count` and `prompt_chars`.
    pub fn with_message(mut self, role: &str, content: &str) -> Self {
        self.message_count = self.message_count.saturating_add(1);
        self.prompt_chars += content.chars().count() as u64;
        let message = Message {
            role: role.to_string(),
            content: content.to_string(),
        };
        self.edit(|owned| owned.messages.push(message));
        self
    }

    /// Adds a prompt item, counted in `prompt_chars`.
    pub fn with_prompt(mut self, text: &str) -> Self {
        self.prompt_chars += text.chars().count() as u64;
        self.edit(|owned| owned.prompt.push(text.to_string()));
        self
    }

    /// Adds a header; `name` is lowercased, as the proxy hands names.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        let header = (name.to_ascii_lowercase(), value.to_string());
        self.edit(|owned| owned.headers.push(header));
        self
    }

    /// Chat messages, in order.
    pub fn messages(&self) -> Vec<Message> {
        self.content().messages()
    }

    /// Prompt items (completions) or inputs (embeddings) as text.
    pub fn prompt(&self) -> Vec<String> {
        self.content().prompt()
    }

    /// The first value of header `name`, whatever the case of `name`.
    pub fn header(&self, name: &str) -> Option<String> {
        self.content().header(name)
    }

    /// Every header, names lowercase, in order of first arrival (a repeated
    /// name's values together).
    pub fn headers(&self) -> Vec<(String, String)> {
        self.content().headers()
    }

    fn content(&self) -> &dyn RequestContent {
        match &self.content {
            Content::Owned(content) => content,
            Content::Shared(content) => content.as_ref(),
        }
    }

    /// Applies `change` to the content as plain values; shared content is
    /// copied first.
    fn edit(&mut self, change: impl FnOnce(&mut OwnedContent)) {
        let placeholder = Content::Owned(OwnedContent::default());
        let mut content = match std::mem::replace(&mut self.content, placeholder) {
            Content::Owned(content) => content,
            Content::Shared(shared) => OwnedContent {
                messages: shared.messages(),
                prompt: shared.prompt(),
                headers: shared.headers(),
            },
        };
        change(&mut content);
        self.content = Content::Owned(content);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_count_messages_and_characters() {
        let req = RouteRequest::new(Endpoint::ChatCompletions, "auto")
            .with_message("system", "bé")
            .with_message("user", "abc")
            .with_header("X-Tier", "premium");
        assert_eq!(req.message_count, 2);
        assert_eq!(req.prompt_chars, 5);
        assert_eq!(req.messages()[1].content, "abc");
        assert_eq!(req.header("x-TIER").as_deref(), Some("premium"));
        assert_eq!(req.headers(), [("x-tier".into(), "premium".into())]);
    }

    #[test]
    fn adding_to_shared_content_keeps_what_it_had() {
        let shared = OwnedContent {
            messages: vec![Message {
                role: "user".into(),
                content: "hi".into(),
            }],
            prompt: Vec::new(),
            headers: vec![("x-a".into(), "1".into())],
        };
        let req = RouteRequest::new(Endpoint::ChatCompletions, "auto")
            .with_content(Arc::new(shared))
            .with_header("x-b", "2");
        assert_eq!(req.messages().len(), 1);
        assert_eq!(req.header("x-a").as_deref(), Some("1"));
        assert_eq!(req.header("x-b").as_deref(), Some("2"));
    }
}
